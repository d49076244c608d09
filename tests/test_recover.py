"""LoRA recovery: the sparsity pattern survives training and merging, and training actually helps."""

import bz2
import math
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llmprune.errors import LLMPruneError
from llmprune.inputs.models import decoder_layers, is_linear, weight_matrix
from llmprune.config import RecoverConfig
from llmprune.recovery.lora import MaskedLoraLinear, MaskedLoraMatmul, masked_lora_config
from llmprune.recovery.train import train_recovery


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    """GPT-2 stores its linears as Conv1D with (in, out) weights."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def prune_rows_by_magnitude(model, sparsity: float = 0.5) -> dict[str, nn.Module]:
    """Zero the smallest |w| of every output row of every linear in the decoder layers."""
    prefix, layers = decoder_layers(model)
    pruned = {}
    for name, module in layers.named_modules():
        if is_linear(module):
            weight = weight_matrix(module)  # (out, in) view of the stored weight
            drop = weight.abs().argsort(dim=1)[:, : int(weight.shape[1] * sparsity)]
            weight.scatter_(1, drop, 0.0)
            pruned[f"{prefix}.{name}"] = module
    return pruned


def epochs(windows: torch.Tensor, count: int) -> torch.Tensor:
    """The windows ``count`` times over: training sees each window once per epoch, and the loss on them can fall."""
    return windows.repeat(count, 1)


def masks_of(pruned: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {name: module.weight != 0 for name, module in pruned.items()}


@torch.no_grad()
def mean_loss(model, ids: torch.Tensor) -> float:
    return model(input_ids=ids, labels=ids, use_cache=False).loss.item()


@pytest.fixture
def pruned_tiny():
    model = tiny_llama()
    pruned = prune_rows_by_magnitude(model)
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    return model, pruned, windows


def test_recovery_keeps_mask_lowers_loss_and_changes_weights(pruned_tiny, tmp_path):
    model, pruned, windows = pruned_tiny
    before = {name: module.weight.detach().clone() for name, module in pruned.items()}
    loss_before = mean_loss(model, windows)
    config = RecoverConfig(steps=30, lr=1e-2, batch=2, seqlen=32)

    stats = train_recovery(model, epochs(windows, 15), None, config, masks=masks_of(pruned), progress=False,
                           adapter_dir=tmp_path / "adapter")
    merged = model

    assert type(merged) is LlamaForCausalLM
    for name, module in pruned.items():
        assert torch.equal(module.weight != 0, before[name] != 0), name
    assert any(not torch.equal(module.weight, before[name]) for name, module in pruned.items())
    assert mean_loss(merged, windows) < loss_before - 0.3
    assert not merged.training
    assert not any(p.requires_grad for p in merged.parameters())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not hasattr(merged, "peft_config")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert stats["lora"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert stats["tokens"] == 30 * 2 * 32 and stats["loss_last"] < stats["loss_first"]


def test_bfloat16_model_keeps_dtype_and_mask():
    model = tiny_llama().to(torch.bfloat16)
    pruned = prune_rows_by_magnitude(model)
    masks = {name: module.weight != 0 for name, module in pruned.items()}
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    loss_before = mean_loss(model, windows)
    train_recovery(model, epochs(windows, 15), None, RecoverConfig(steps=30, lr=1e-2, batch=2, seqlen=32), masks=masks,
                   progress=False)
    merged = model
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert all(torch.equal(module.weight != 0, masks[name]) for name, module in pruned.items())
    assert mean_loss(merged, windows) < loss_before - 0.3


def test_recovery_is_deterministic_and_leaves_global_rng_alone():
    results = []
    for _ in range(2):
        model = tiny_llama()
        prune_rows_by_magnitude(model)
        windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(123)
        train_recovery(model, epochs(windows, 2), None, RecoverConfig(steps=3, lr=1e-2, batch=2, seqlen=16),
                       progress=False)
        merged = model
        draw_after = torch.rand(1)
        torch.manual_seed(123)
        assert torch.equal(draw_after, torch.rand(1))
        results.append(merged.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(*results)


def test_only_targets_are_trained(pruned_tiny):
    model, pruned, windows = pruned_tiny
    before = {name: module.weight.detach().clone() for name, module in pruned.items()}
    stats = train_recovery(model, windows, None,
                           RecoverConfig(steps=2, lr=1e-2, batch=2, seqlen=32, targets=["v_proj"]),
                           masks=masks_of(pruned), progress=False)
    changed = {name.rsplit(".", 1)[-1] for name, m in pruned.items() if not torch.equal(m.weight, before[name])}
    assert changed == {"v_proj"} and stats["lora"]["targets"] == ["v_proj"]


def test_gpt2_conv1d_linears_keep_their_mask():
    model = tiny_gpt2()
    pruned = prune_rows_by_magnitude(model)
    before = {name: module.weight.detach().clone() for name, module in pruned.items()}
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    loss_before = mean_loss(model, windows)
    # masks=None: found from the zeros in the decoder layers
    stats = train_recovery(model, epochs(windows, 15), None, RecoverConfig(steps=30, lr=1e-2, batch=2, seqlen=32),
                           progress=False)
    merged = model
    assert stats["lora"]["targets"] == ["c_attn", "c_proj", "c_fc"]
    for name, module in pruned.items():
        assert torch.equal(module.weight != 0, before[name] != 0), name
        assert not torch.equal(module.weight, before[name]), name
    assert mean_loss(merged, windows) < loss_before - 0.3


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft 0.21 vs transformers 5
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("dropout", [0.0, 0.1])  # fused forward, and the separate-delta path LoRA dropout needs
def test_masked_lora_trains_exactly_the_model_it_merges(build, dropout):
    """The training forward (masked delta) equals the merged sparse model; plain LoRA would merge densely."""
    model = build()
    pruned = prune_rows_by_magnitude(model)
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    masks = {name: module.weight != 0 for name, module in pruned.items()}
    config = RecoverConfig(r=4, alpha=8, dropout=dropout)
    peft_model = get_peft_model(model, masked_lora_config(config, list(pruned))).eval()  # eval: dropout off
    lora_layers = [module for module in peft_model.modules() if isinstance(module, MaskedLoraLinear)]
    assert len(lora_layers) == len(pruned)
    with torch.no_grad():
        for module in lora_layers:
            nn.init.normal_(module.lora_B["default"].weight, std=0.1)  # peft starts B at 0: make the delta real
        logits_training = peft_model(windows).logits
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(windows).logits, logits_training, rtol=1e-4, atol=1e-4)
    modules = dict(merged.named_modules())
    for name, mask in masks.items():
        assert torch.equal(modules[name].weight != 0, mask), name


def test_masked_lora_matmul_gradients_match_finite_differences():
    """The hand-written backward (effective weight formed again, gradient masked) against float64 finite
    differences of the forward, on a weight with pruned zeros and a bias."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 7, generator=generator) > 0.5
    weight = torch.randn(6, 7, generator=generator, dtype=torch.float64) * mask
    bias = torch.randn(6, generator=generator, dtype=torch.float64)
    x = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    lora_a = torch.randn(3, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: MaskedLoraMatmul.apply(x, weight, bias, a, b, mask, 0.7),
                                    (x, lora_a, lora_b))


@pytest.mark.parametrize("structured", [False, True])
def test_lora_step_keeps_no_weight_sized_copy_for_backward(structured, monkeypatch):
    """What a LoRA training forward keeps for its backward pass: activations, and references to the model's own
    weights and masks, but no new weight-sized tensor (an effective weight W + M * sBA per linear is a copy of every
    adapted weight per step). Sparse: masked LoRA; structured (masks={}): plain LoRA."""
    model = tiny_llama()
    pruned = {} if structured else prune_rows_by_magnitude(model)
    config = RecoverConfig(steps=1, batch=2, seqlen=24)  # 48 tokens: no activation has a weight's shape
    windows = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    weight_shapes = {tuple(module.weight.shape) for module in (pruned or
                     {n: m for n, m in decoder_layers(model)[1].named_modules() if is_linear(m)}).values()}
    copies, held = [], set()

    def keep(tensor):
        if tuple(tensor.shape) in weight_shapes and tensor.untyped_storage().data_ptr() not in held:
            copies.append(tuple(tensor.shape))
        return tensor

    import llmprune.recovery.train as train_module

    real_loop = train_module.train_loop

    def loop(params, batches, loss_of, **kwargs):
        def traced(window_indices):
            held.update(t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers()))
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
                return loss_of(window_indices)
        return real_loop(params, batches, traced, **kwargs)

    monkeypatch.setattr(train_module, "train_loop", loop)
    train_recovery(model, windows, None, config, masks=None if not structured else {}, progress=False)
    assert copies == []


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_saved_model_reproduces_the_training_forward(build, tmp_path, monkeypatch):
    """What ships is what was trained: after LoRA recovery, the model saved and loaded back gives the logits that
    the training-time model (adapters active, unmerged) gave on the validation windows after the last step, and
    holds every pruned zero. Plain LoRA trains a dense delta, whose forward no sparse model reproduces; a merge
    that drops the mask writes into pruned weights: either fails here."""
    import llmprune.recovery.train as train_module

    model = build()
    masks = masks_of(prune_rows_by_magnitude(model))
    train = epochs(torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1)), 5)
    val = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    training_logits = []
    score = train_module.perplexity

    def recording(trainee, windows, device, **kwargs):  # the validation pass: trainee in eval mode, unmerged
        with torch.no_grad():
            training_logits.append(trainee(input_ids=windows, use_cache=False).logits)
        return score(trainee, windows, device, **kwargs)

    monkeypatch.setattr(train_module, "perplexity", recording)
    train_recovery(model, train, val, RecoverConfig(steps=10, lr=1e-2, batch=2, seqlen=32), masks=masks,
                   progress=False)
    model.save_pretrained(tmp_path / "recovered")
    reloaded = type(model).from_pretrained(tmp_path / "recovered").eval()

    first, last = training_logits[0], training_logits[-1]
    assert len(training_logits) == 2 and (last - first).abs().max() > 0.1  # the adapters did train
    with torch.no_grad():
        torch.testing.assert_close(reloaded(val, use_cache=False).logits, last, rtol=1e-5, atol=1e-5)
    for name, mask in masks.items():
        weight = reloaded.get_submodule(name).weight
        assert not bool(weight[~mask].any()), name
        assert bool(weight[mask].all()), name  # no kept weight landed on zero either


def test_unknown_target_lists_valid_names(pruned_tiny):
    model, pruned, windows = pruned_tiny
    with pytest.raises(LLMPruneError, match="valid pruned linears are q_proj, k_proj, v_proj, o_proj, gate_proj"):
        train_recovery(model, windows, None, RecoverConfig(steps=1, batch=1, seqlen=32, targets=["q_proj", "qkv"]),
                       masks=masks_of(pruned), progress=False)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_failed_training_hands_back_the_unwrapped_pruned_model(pruned_tiny, monkeypatch):
    model, pruned, windows = pruned_tiny
    before = {name: module.weight.detach().clone() for name, module in pruned.items()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llmprune.recovery.train.train_loop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_recovery(model, windows, None, RecoverConfig(steps=1, batch=1, seqlen=32), masks=masks_of(pruned),
                       progress=False)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not hasattr(model, "peft_config")
    assert all(torch.equal(module.weight, before[name]) for name, module in pruned.items())


def test_windows_must_match_seqlen(pruned_tiny):
    model, pruned, windows = pruned_tiny
    with pytest.raises(LLMPruneError, match="seqlen=64"):
        train_recovery(model, windows, None, RecoverConfig(steps=1, batch=1, seqlen=64), masks=masks_of(pruned),
                       progress=False)


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"steps": 0}, "--recover-steps"),
        ({"batch": -1}, "--recover-batch"),
        ({"seqlen": 1}, "--recover-seqlen"),
        ({"r": 0}, "--lora-r"),
        ({"r": 2.5}, "--lora-r"),
        ({"lr": 0.0}, "--recover-lr"),
        ({"lr": float("nan")}, "--recover-lr"),
        ({"alpha": -16}, "--lora-alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": []}, "--lora-targets"),
        ({"targets": "q_proj"}, "--lora-targets"),
    ],
)
def test_bad_config_values_name_the_fix(kwargs, hint):
    with pytest.raises(LLMPruneError, match=hint):
        RecoverConfig(**kwargs)


def wiki_articles() -> list[str]:
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    data = Path(gensim.__file__).parent / "test" / "test_data"
    dump = data / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    with bz2.open(dump) as handle:
        return [filter_wiki(text) for _, text, _ in extract_pages(handle) if len(text) > 5000]


def token_windows(tokenizer, texts: list[str], seqlen: int) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    count = ids.numel() // seqlen
    return ids[: count * seqlen].view(count, seqlen)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    return math.exp(sum(mean_loss(model, window[None]) for window in windows) / len(windows))


@pytest.mark.slow
def test_recovery_lowers_heldout_perplexity_of_pruned_smollm2(embedded):
    model, tokenizer, dense_state = embedded
    try:
        pruned = prune_rows_by_magnitude(model)
        masks = {name: module.weight != 0 for name, module in pruned.items()}
        articles = wiki_articles()
        train = token_windows(tokenizer, articles[:10], 256)
        heldout = token_windows(tokenizer, articles[-4:], 256)[:8]
        ppl_before = perplexity(model, heldout)

        stats = train_recovery(model, train, None, RecoverConfig(steps=12, lr=5e-4, batch=1, seqlen=256),
                               masks=masks, progress=False)
        merged = model

        ppl_after = perplexity(merged, heldout)
        print(f"held-out ppl {ppl_before:.1f} -> {ppl_after:.1f}; {stats}")
        assert ppl_after < 0.9 * ppl_before  # measured: 368 -> 262
        for name, module in pruned.items():
            assert torch.equal(module.weight != 0, masks[name]), name
    finally:
        model.load_state_dict(dense_state)  # the session model is shared with other slow tests
