"""Distillation and full sparse fine-tuning: the loss against float64 brute force, teacher targets in memory and on
disk, zeros kept exactly, the KL to the teacher going down, and bad input refused before any work."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmprune.errors import LLMPruneError
from llmprune.inputs.models import decoder_layers, is_linear, weight_matrix
from llmprune.config import RecoverConfig
from llmprune.recovery.distill import TeacherTargets, evenly_spaced_layers, teacher_topk, topk_with_bucket
from llmprune.recovery.loop import epoch_order, train_loop
from llmprune.recovery.losses import distill_loss, hidden_loss, token_loss_share
from llmprune.recovery.train import check_recovery, recovery_windows, train_recovery
from tiny_models import VOCAB, tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a shared CPU makes OpenMP's waits costly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_windows(n: int, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def prune_rows(model, sparsity: float = 0.5) -> dict[str, torch.Tensor]:
    """Zero the smallest |w| of every output row of every decoder linear; returns the keep-masks (stored layout)."""
    prefix, layers = decoder_layers(model)
    masks = {}
    with torch.no_grad():
        for name, module in layers.named_modules():
            if is_linear(module):
                weight = weight_matrix(module)
                weight.scatter_(1, weight.abs().argsort(dim=1)[:, : int(weight.shape[1] * sparsity)], 0.0)
                masks[f"{prefix}.{name}"] = module.weight != 0
    return masks


@torch.no_grad()
def full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean over tokens of KL(teacher || student) over the whole vocabulary, in float64, times T^2."""
    p = F.softmax(teacher_logits.double() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.double() / temperature, dim=-1)
    return float((p * (p.log() - log_q)).sum(-1).mean()) * temperature**2


# ---- the loss ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_loss_with_k_covering_the_vocabulary_is_the_full_kl(temperature):
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 2, 5, 11, generator=generator) * 3
    loss = distill_loss(student, *topk_with_bucket(teacher, 11, temperature), temperature)
    assert loss.item() == pytest.approx(full_kl(teacher, student, temperature), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_collapsed_loss_and_gradient_match_a_direct_float64_computation(temperature):
    """k < vocab: both distributions collapsed onto (top-k tokens, everything else), summed directly."""
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 2, 4, 13, generator=generator) * 3
    k = 3
    student32 = student.clone().requires_grad_(True)
    loss = distill_loss(student32, *topk_with_bucket(teacher, k, temperature), temperature)
    loss.backward()

    student64 = student.double().requires_grad_(True)
    p = F.softmax(teacher.double() / temperature, dim=-1)
    q = F.softmax(student64 / temperature, dim=-1)
    total = 0
    for b in range(2):
        for s in range(4):
            top = sorted(range(13), key=lambda v: -float(p[b, s, v]))[:k]
            p_top, q_top = p[b, s, top], q[b, s, top]
            p_rest, q_rest = 1 - p_top.sum(), 1 - q_top.sum()
            total = total + (p_top * (p_top / q_top).log()).sum() + p_rest * (p_rest / q_rest).log()
    direct = total / 8 * temperature**2
    direct.backward()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    torch.testing.assert_close(student32.grad.double(), student64.grad, rtol=1e-4, atol=1e-7)
    assert loss.item() < full_kl(teacher, student, temperature)  # merging outcomes only loses information


@pytest.mark.parametrize("loss, alpha", [("lm", 0.0), ("distill", 0.0), ("distill", 0.3)])
def test_token_loss_shares_of_chunks_add_up_to_the_step_loss(loss, alpha):
    """A step of 2 windows x 5 tokens cut into chunks of 3 tokens: the shares add up to (1 - alpha) * KL + alpha *
    LM (or LM alone), the LM term the mean over the 8 tokens with a next token, computed token by token in float64."""
    from llmprune.recovery.losses import next_token_labels

    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 2, 5, 11, generator=generator) * 3
    ids = torch.randint(0, 11, (2, 5), generator=generator)
    labels = next_token_labels(ids)
    assert labels[:, :-1].tolist() == ids[:, 1:].tolist() and labels[:, -1].tolist() == [-100, -100]
    rows = [labels.flatten()] + [t.flatten(0, 1) for t in topk_with_bucket(teacher, 11, 1.0)]
    logits = student.flatten(0, 1)
    total = sum(token_loss_share(logits[start : start + 3], *(row[start : start + 3] for row in rows), loss=loss,
                                 alpha=alpha, temperature=1.0, step_tokens=10, step_predicted=8).item()
                for start in range(0, 10, 3))
    log_q = F.log_softmax(student.double(), dim=-1)
    lm = -sum(float(log_q[b, s, ids[b, s + 1]]) for b in range(2) for s in range(4)) / 8
    expected = lm if loss == "lm" else (1 - alpha) * full_kl(teacher, student) + alpha * lm
    assert total == pytest.approx(expected, rel=1e-5)


def test_teacher_pass_and_float16_storage_reproduce_the_models_kl():
    """teacher_topk on a model, k = vocab, stored as float16: the loss is the full KL to that model's logits."""
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    windows = random_windows(3)
    targets = teacher_topk(teacher, windows, VOCAB, batch_size=2, progress=False)
    with torch.no_grad():
        teacher_logits, student_logits = teacher(windows).logits, student(windows).logits
        loss = distill_loss(student_logits, *targets.rows(torch.arange(3)), 1.0)
    assert targets.topk == VOCAB and targets.vocab_size == VOCAB
    assert loss.item() == pytest.approx(full_kl(teacher_logits, student_logits), rel=2e-3)


def test_spilled_targets_equal_in_memory_ones(tmp_path):
    model = tiny_model("llama")
    windows = random_windows(7)
    kwargs = dict(k=5, batch_size=2, progress=False, temperature=2.0, chunk_windows=3)  # chunks of 3, 3, 1
    in_memory = teacher_topk(model, windows, **kwargs)
    spilled = teacher_topk(model, windows, spill_dir=tmp_path / "teacher", **kwargs)
    reloaded = TeacherTargets.load(tmp_path / "teacher")
    assert all(isinstance(chunk, dict) for chunk in in_memory.chunks)
    assert len(list((tmp_path / "teacher").glob("teacher-*.safetensors"))) == 3
    order = torch.tensor([6, 0, 4, 4, 2])  # across chunks, out of order, repeated
    expected = in_memory.rows(order)
    for targets in (spilled, reloaded):
        for got, want in zip(targets.rows(order), expected):
            assert torch.equal(got, want)
    assert torch.equal(reloaded.windows, windows) and reloaded.temperature == 2.0 and reloaded.topk == 5
    for got, want in zip(spilled.subset(3, 7).rows(torch.tensor([3, 0])), in_memory.rows(torch.tensor([6, 3]))):
        assert torch.equal(got, want)
    # The bucket holds the rest of the mass: top-k probabilities and bucket sum to 1 (float16 values).
    logprobs, _, rest = expected
    torch.testing.assert_close(logprobs.exp().sum(-1) + rest.exp().squeeze(-1), torch.ones(5, 32), atol=2e-3, rtol=0)


# ---- hidden-state matching ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_teacher_keeps_the_layer_outputs_the_model_computes(family, tmp_path):
    """hidden_layers=(0, 1) of 3: what is stored is the model's own hidden_states[i + 1] (bfloat16), spilled or not."""
    model = tiny_model(family)
    windows = random_windows(5)
    with torch.no_grad():
        reference = model(windows, output_hidden_states=True).hidden_states
    hooks = [len(layer._forward_hooks) for layer in decoder_layers(model)[1]]  # transformers may keep its own
    kwargs = dict(k=4, batch_size=2, progress=False, chunk_windows=2, hidden_layers=(1, 0))
    in_memory = teacher_topk(model, windows, **kwargs)
    teacher_topk(model, windows, spill_dir=tmp_path / "t", **kwargs)
    reloaded = TeacherTargets.load(tmp_path / "t")
    order = torch.tensor([4, 0, 2])
    for targets in (in_memory, reloaded):
        assert targets.hidden_layers == (0, 1) and targets.hidden_size == 64
        rows = targets.hidden_rows(order)
        for layer in (0, 1):
            torch.testing.assert_close(rows[layer], reference[layer + 1][order], rtol=8e-3, atol=1e-5)
    assert in_memory.bytes_per_token == 4 * 6 + 4 + 2 * 2 * 64
    assert [len(layer._forward_hooks) for layer in decoder_layers(model)[1]] == hooks


def test_hidden_loss_matches_a_float64_brute_force():
    generator = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 3, 5, generator=generator) for _ in range(2)]
    teacher = [torch.randn(2, 3, 5, generator=generator) * 4 for _ in range(2)]
    per_layer = []
    for s, t in zip(student, teacher):
        s, t = s.double().tolist(), t.double().tolist()
        ratios = [sum((a - b) ** 2 for a, b in zip(s[i][j], t[i][j])) / sum(b * b for b in t[i][j])
                  for i in range(2) for j in range(3)]
        per_layer.append(sum(ratios) / len(ratios))
    assert hidden_loss(student, teacher).item() == pytest.approx(sum(per_layer) / 2, rel=1e-6)


def test_evenly_spaced_layers_end_at_the_last():
    assert evenly_spaced_layers(30, 4) == (7, 14, 21, 29)
    assert evenly_spaced_layers(3, 1) == (2,) and evenly_spaced_layers(3, 8) == (0, 1, 2)


def test_hidden_term_matches_layers_by_their_dense_index_after_layer_removal():
    """Dense 4 layers, layer 1 removed: dense layers 0 and 2 are the student's 0 and 1. The first loss (before any
    step) is the full KL plus the mean relative error of those two pairs, computed here from the models' own
    forwards; an unpruned student starts at zero."""
    import copy

    model = tiny_model("llama", layers=4)
    windows = random_windows(4)
    targets = teacher_topk(model, windows, VOCAB, batch_size=2, progress=False, hidden_layers=(0, 2))
    config = RecoverConfig(loss="distill", params="full", steps=1, batch=4, seqlen=32, lr=1e-3, distill_topk=VOCAB,
                            distill_hidden=0.5)
    same = train_recovery(copy.deepcopy(model), windows, None, config, teacher=targets, masks={}, progress=False)
    assert same["loss_first"] < 1e-4 and same["hidden"]["student_layers"] == [0, 2]

    student = copy.deepcopy(model)
    del student.model.layers[1]
    student.config.num_hidden_layers = 3
    for index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = index
    with torch.no_grad():
        dense = model(windows, output_hidden_states=True)
        pruned = student(windows, output_hidden_states=True)
    pairs = [(pruned.hidden_states[1], dense.hidden_states[1]), (pruned.hidden_states[2], dense.hidden_states[3])]
    hooks = [len(layer._forward_hooks) for layer in student.model.layers]  # transformers may keep its own
    relative = [float(((s - t).double().pow(2).sum(-1) / t.double().pow(2).sum(-1)).mean()) for s, t in pairs]
    expected = full_kl(dense.logits, pruned.logits) + 0.5 * sum(relative) / 2
    stats = train_recovery(student, windows, None, config, teacher=targets, masks={}, progress=False,
                           kept_layers=[0, 2, 3])
    assert stats["hidden"] == {"weight": 0.5, "dense_layers": [0, 2], "student_layers": [0, 1]}
    assert relative[1] > 0.01 and stats["loss_first"] == pytest.approx(expected, rel=2e-3)
    assert [len(layer._forward_hooks) for layer in student.model.layers] == hooks


def test_hidden_term_refuses_what_it_cannot_match():
    model = tiny_model("llama")
    windows = random_windows(2)
    config = RecoverConfig(loss="distill", params="full", steps=1, batch=2, seqlen=32, distill_topk=8,
                            distill_hidden=1.0)
    plain = teacher_topk(model, windows, 8, progress=False)
    with pytest.raises(LLMPruneError, match="hidden_layers"):
        train_recovery(model, windows, None, config, teacher=plain, masks={}, progress=False)
    last_only = teacher_topk(model, windows, 8, progress=False, hidden_layers=(2,))
    with pytest.raises(LLMPruneError, match="survived the prune: raise --distill-hidden-layers"):
        train_recovery(model, windows, None, config, teacher=last_only, masks={}, progress=False,
                       kept_layers=[0, 1, 3])
    with pytest.raises(LLMPruneError, match="use loss='distill'"):
        train_recovery(model, windows, None, RecoverConfig(steps=1, batch=2, seqlen=32, distill_hidden=1.0),
                       masks={}, progress=False)
    with pytest.raises(LLMPruneError, match="outside the model's 3 decoder layers"):
        teacher_topk(model, windows, 8, progress=False, hidden_layers=(3,))
    from llmprune.config import RunConfig

    with pytest.raises(LLMPruneError, match="--distill-hidden adds to the distillation loss"):
        RunConfig(model="llama", recover="lora", recovery={"distill_hidden": 1.0})


# ---- the loss a chunk of tokens at a time -------------------------------------------------------------------------

def test_chunked_sum_matches_the_whole_computation_in_float64():
    """chunked_sum over chunks of 5 of 2 x 8 tokens (chunks straddle the windows) against the whole sum: the same
    value and the same gradients for the hidden state and the head's weight."""
    from llmprune.recovery.chunked import chunked_sum

    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False).double()
    hidden = torch.randn(2, 8, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 8), generator=generator)
    labels[:, -1] = -100

    def token_loss(logits, labels):
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

    whole = token_loss(head(hidden).flatten(0, 1), labels.flatten())
    whole_grads = torch.autograd.grad(whole, (hidden, head.weight))
    chunked = chunked_sum(hidden, head, token_loss, (labels,), 5)
    chunked_grads = torch.autograd.grad(chunked, (hidden, head.weight))
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-12)
    for got, want in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_split_head_reproduces_the_models_logits_or_declines(family):
    from llmprune.recovery.chunked import split_head

    model = tiny_model(family)
    split = split_head(model, random_windows(1))
    assert split is not None and split.head is model.get_output_embeddings()
    capped = tiny_model("gemma3")
    capped.config.final_logit_softcapping = 0.5  # applied after the head: decoder + head alone differ
    assert split_head(capped, random_windows(1)) is None


@pytest.mark.parametrize("loss, alpha", [("lm", 0.0), ("distill", 0.0), ("distill", 0.3)])
def test_chunked_step_loss_is_the_models_own(loss, alpha):
    """The first step's loss, chunks of 7 tokens: the model's own LM loss (transformers' labels= path) and the
    float64 KL to the teacher's logits (k = vocab), mixed by alpha; and the same as without chunks."""
    dense = tiny_model("llama")
    windows = random_windows(4)
    targets = teacher_topk(dense, windows, VOCAB, progress=False) if loss == "distill" else None
    student = tiny_model("llama", seed=3)
    with torch.no_grad():
        lm = student(windows, labels=windows).loss.item()
        kl = full_kl(dense(windows).logits, student(windows).logits)
    expected = {"lm": lm, "distill": (1 - alpha) * kl + alpha * lm}[loss]
    firsts = []
    for chunk in (7, 0):
        config = RecoverConfig(loss=loss, params="full", steps=1, batch=4, seqlen=32, lr=1e-6, distill_topk=VOCAB,
                                distill_alpha=alpha, loss_chunk=chunk)
        stats = train_recovery(copy_of(student), windows, None, config, teacher=targets, masks={}, progress=False)
        assert stats["loss_chunk"] == chunk
        firsts.append(stats["loss_first"])
    assert firsts[0] == pytest.approx(expected, rel=2e-3) and firsts[0] == pytest.approx(firsts[1], rel=1e-5)


def copy_of(model):
    import copy

    return copy.deepcopy(model)


# ---- training ---------------------------------------------------------------------------------------------------

def dense_and_pruned(family: str):
    """(the dense model's logits on windows, its teacher targets, the pruned model, masks, train and val windows)."""
    model = tiny_model(family)
    train, val = random_windows(24), random_windows(4, seed=2)
    with torch.no_grad():
        dense_logits = model(train).logits
    targets = teacher_topk(model, train, 16, batch_size=8, progress=False)
    masks = prune_rows(model, 0.8)  # far from the teacher: random tiny models are near-uniform, so 50% barely hurts
    return dense_logits, targets, model, masks, train, val


@torch.no_grad()
def kl_to(model, dense_logits, windows) -> float:
    return full_kl(dense_logits, model(windows).logits)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_full_distillation_keeps_zeros_exactly_and_lowers_kl(family):
    dense_logits, targets, model, masks, train, val = dense_and_pruned(family)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    kl_before = kl_to(model, dense_logits, train)
    config = RecoverConfig(loss="distill", params="full", steps=12, batch=2, seqlen=32, lr=1e-3, distill_topk=16,
                            weight_decay=0.1, eval_every=5)  # decay on: it must not revive zeros either

    stats = train_recovery(model, train, val, config, teacher=targets, masks=masks, progress=False)

    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), name
        assert not torch.equal(weight, before[f"{name}.weight"]), name
    trained = {f"{name}.{leaf}" for name in masks for leaf in ("weight", "bias")}
    for name, param in model.named_parameters():
        if name not in trained:  # embeddings, norms: not part of the pruned linears
            assert torch.equal(param, before[name]), name
    assert kl_to(model, dense_logits, train) < 0.8 * kl_before
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert [point["step"] for point in stats["curve"]] == [0, 5, 10, 12]
    assert [point["tokens"] for point in stats["curve"]] == [0, 320, 640, 768] and stats["tokens"] == 768
    assert stats["curve"][0]["train_loss"] is None and stats["curve"][-1]["val_ppl"] == stats["val_ppl_last"]
    assert stats["sparsity_before"] == stats["sparsity_after"] == pytest.approx(0.8, abs=0.02)
    assert stats["loss"] == "distill" and stats["params"] == "full" and stats["topk"] == 16
    assert stats["trained_parameters"] == sum(modules[n.rsplit(".", 1)[0]].get_parameter(n.rsplit(".", 1)[1]).numel()
                                              for n in trained if n in before)


def test_lora_distillation_keeps_mask_and_lowers_kl(tmp_path):
    dense_logits, targets, model, masks, train, val = dense_and_pruned("llama")
    kl_before = kl_to(model, dense_logits, train)
    config = RecoverConfig(loss="distill", params="lora", steps=12, batch=2, seqlen=32, lr=3e-3, distill_topk=16,
                            eval_every=0)
    stats = train_recovery(model, train, val, config, teacher=targets, masks=masks, progress=False,
                           adapter_dir=tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    modules = dict(model.named_modules())
    assert all(torch.equal(modules[name].weight != 0, mask) for name, mask in masks.items())
    assert kl_to(model, dense_logits, train) < 0.8 * kl_before
    assert [point["step"] for point in stats["curve"]] == [0, 12] and stats["lora"]["r"] == 8


def test_alpha_mixes_in_the_lm_loss():
    """The first step's loss computed by hand (LoRA starts as a zero delta, so the model is the pruned one): the
    model's own LM loss and the collapsed KL on the first batch, weighted 0.3 / 0.7."""
    _, targets, model, masks, train, val = dense_and_pruned("llama")
    first = epoch_order(len(train), 2, seed=0)
    with torch.no_grad():
        output = model(train[first], labels=train[first])
        kl = distill_loss(output.logits, *targets.rows(first), 1.0)
    config = RecoverConfig(loss="distill", params="lora", steps=1, batch=2, seqlen=32, distill_topk=16, distill_alpha=0.3)
    stats = train_recovery(model, train, None, config, teacher=targets, masks=masks, progress=False)
    assert stats["loss_first"] == pytest.approx(0.3 * output.loss.item() + 0.7 * kl.item(), rel=1e-5)
    assert stats["alpha"] == 0.3 and stats["temperature"] == 1.0


def test_validation_passes_leave_lora_training_unchanged():
    """Scoring validation windows every 2 steps (eval mode, no grad, then back to training) changes nothing the
    training computes: the same weights result as a run without validation."""
    results = []
    for validate in (False, True):
        model = tiny_model("llama")
        masks = prune_rows(model)
        train = random_windows(8)
        config = RecoverConfig(steps=4, batch=2, seqlen=32, lr=1e-2, dropout=0.1, eval_every=2 if validate else 0)
        train_recovery(model, train, random_windows(2, seed=2) if validate else None, config, masks=masks,
                       progress=False)
        results.append(model.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(*results)


@pytest.mark.parametrize("params", ["lora", "full"])
def test_gradient_checkpointing_checkpoints_and_trains_the_same(params, monkeypatch):
    import transformers.modeling_utils
    from torch.utils.checkpoint import checkpoint

    checkpointed_calls = []

    def counting_checkpoint(*args, **kwargs):
        checkpointed_calls.append(kwargs.get("use_reentrant"))
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    runs = []
    for checkpointing in (False, True):
        dense_logits, targets, model, masks, train, val = dense_and_pruned("llama")
        config = RecoverConfig(loss="distill", params=params, steps=3, batch=2, seqlen=32, lr=3e-3, distill_topk=16,
                                gradient_checkpointing=checkpointing)
        stats = train_recovery(model, train, val, config, teacher=targets, masks=masks, progress=False)
        runs.append((stats, model.model.layers[0].self_attn.q_proj.weight))
        assert not model.is_activation_checkpointing
        with torch.inference_mode():  # no hook left behind that would set requires_grad on inference tensors
            model(train[:1])
    assert checkpointed_calls == [False] * 3 * 3  # every layer of every step; validation passes run plainly
    (plain, plain_weight), (checkpointed, checkpointed_weight) = runs
    assert checkpointed["loss_first"] == pytest.approx(plain["loss_first"], rel=1e-6)
    torch.testing.assert_close(checkpointed_weight, plain_weight, rtol=1e-5, atol=1e-6)


def test_bf16_precision_keeps_zeros_and_matches_float32_closely():
    """Mixed precision runs the matmuls in bfloat16 (the first loss differs from float32's in the low bits) while
    the weights stay float32, masked gradients keep every zero, and training still lowers the KL."""
    runs = []
    for precision in ("float32", "bf16"):
        dense_logits, targets, model, masks, train, val = dense_and_pruned("llama")
        kl_before = kl_to(model, dense_logits, train)
        config = RecoverConfig(loss="distill", params="full", steps=8, batch=2, seqlen=32, lr=1e-3,
                                distill_topk=16, precision=precision)
        stats = train_recovery(model, train, val, config, teacher=targets, masks=masks, progress=False)
        modules = dict(model.named_modules())
        for name, mask in masks.items():
            weight = modules[name].weight
            assert weight.dtype == torch.float32 and not bool(weight[~mask].any()), name
        assert kl_to(model, dense_logits, train) < 0.8 * kl_before
        runs.append(stats)
    plain, mixed = runs
    assert mixed["precision"] == "bf16" and mixed["loss_first"] != plain["loss_first"]
    assert mixed["loss_first"] == pytest.approx(plain["loss_first"], rel=0.05)


def test_structurally_smaller_model_trains_every_weight():
    """masks={}: no zeros to keep (e.g. channels removed), so full fine-tuning trains embeddings and norms too."""
    model = tiny_model("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stats = train_recovery(model, random_windows(8), None,
                           RecoverConfig(params="full", steps=3, batch=2, seqlen=32, lr=1e-3), masks={},
                           progress=False)
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert stats["trained_parameters"] == sum(p.numel() for p in model.parameters()) and stats["curve"] == []
    assert "sparsity_after" not in stats


def test_recovery_windows_split_training_from_validation():
    tokens = torch.arange(1000)
    train, val = recovery_windows(tokens, RecoverConfig(steps=5, batch=2, seqlen=32, val_windows=3))
    assert train.shape == (10, 32) and val.shape == (3, 32)
    assert torch.equal(val, tokens[28 * 32 : 31 * 32].view(3, 32))  # the end of the text
    assert set(train[:, 0].tolist()).isdisjoint(val[:, 0].tolist()) and bool((train[:, 0] % 32 == 0).all())


# ---- bad input, refused before any work --------------------------------------------------------------------------

def test_budget_larger_than_the_text_is_refused():
    with pytest.raises(LLMPruneError, match=r"holds 1000 tokens \(31 windows\).*--recover-steps"):
        recovery_windows(torch.arange(1000), RecoverConfig(steps=15, batch=2, seqlen=32, val_windows=3))
    model = tiny_model("llama")
    masks = prune_rows(model)
    with pytest.raises(LLMPruneError, match="only 5 windows"):
        train_recovery(model, random_windows(5), None, RecoverConfig(steps=3, batch=2, seqlen=32), masks=masks)


def test_teacher_must_match_the_student():
    dense_logits, targets, model, masks, train, val = dense_and_pruned("llama")
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    config = RecoverConfig(loss="distill", params="full", steps=2, batch=2, seqlen=32, distill_topk=16)
    other_vocab = teacher_topk(tiny_model("llama", vocab=160), train, 16, progress=False)
    with pytest.raises(LLMPruneError, match="vocabulary has 160 tokens but the student's has 128"):
        train_recovery(model, train, val, config, teacher=other_vocab, masks=masks, progress=False)
    with pytest.raises(LLMPruneError, match="other windows"):
        train_recovery(model, random_windows(24, seed=9), val, config, teacher=targets, masks=masks, progress=False)
    with pytest.raises(LLMPruneError, match="before pruning"):
        train_recovery(model, train, val, config, teacher=None, masks=masks, progress=False)
    with pytest.raises(LLMPruneError, match="--distill-temperature"):
        train_recovery(model, train, val, RecoverConfig(loss="distill", params="full", steps=2, batch=2, seqlen=32,
                                                         distill_topk=16, distill_temperature=2.0),
                       teacher=targets, masks=masks, progress=False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_full_params_refused_when_the_mask_cannot_be_held(monkeypatch):
    model = tiny_model("llama")
    masks = prune_rows(model)
    config = RecoverConfig(params="full", steps=2, batch=2, seqlen=32)
    monkeypatch.setattr("llmprune.recovery.params.available_memory_bytes", lambda device: 1000)
    with pytest.raises(LLMPruneError, match="free: use --recover-params lora"):
        check_recovery(tiny_model("llama"), config)  # on the dense model, before any work
    with pytest.raises(LLMPruneError, match="free: use --recover-params lora"):
        train_recovery(model, random_windows(4), None, config, masks=masks, progress=False)
    check_recovery(tiny_model("llama"), RecoverConfig(params="lora"))  # LoRA's footprint is not estimated
    monkeypatch.undo()
    name = next(name for name in masks if name.endswith("up_proj"))  # not square: a transposed mask is wrong
    with pytest.raises(LLMPruneError, match="non-zero weights where its mask prunes them"):
        train_recovery(model, random_windows(4), None, config, masks={name: torch.zeros_like(masks[name])})
    with pytest.raises(LLMPruneError, match="bool tensor of its weight's shape"):
        train_recovery(model, random_windows(4), None, config, masks={name: masks[name].T})


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"loss": "kd"}, "lm, distill"),
        ({"params": "half"}, "--recover-params"),
        ({"distill_temperature": 0.0}, "--distill-temperature"),
        ({"distill_alpha": 1.5}, "--distill-alpha"),
        ({"distill_topk": 0}, "--distill-topk"),
        ({"eval_every": -1}, "--eval-every"),
        ({"steps": 0}, "--recover-steps"),
        ({"r": 0}, "--lora-r"),
        ({"distill_hidden": -1.0}, "--distill-hidden"),
        ({"distill_hidden_layers": 0}, "--distill-hidden-layers"),
        ({"loss_chunk": -1}, "--recover-loss-chunk"),
    ],
)
def test_bad_config_values_name_the_fix(kwargs, hint):
    with pytest.raises(LLMPruneError, match=hint):
        RecoverConfig(**kwargs)


def test_default_learning_rate_depends_on_what_is_trained():
    assert RecoverConfig(params="lora").lr == 5e-4 and RecoverConfig(params="full").lr == 1e-5
    assert math.isclose(RecoverConfig(params="full", lr=3e-5).lr, 3e-5)


def test_bench_recover_quick_run(tmp_path):
    """scripts/bench_recover.py --quick end to end on one row: JSON with the curve and goals, and a PNG."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_recover",
                                                  Path(__file__).parents[1] / "scripts" / "bench_recover.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "results"
    bench.main(["--quick", "--out", str(out), "--prunes", "wanda-50%", "--rows", "full-distill/4x"])
    results = json.loads((out / "recover.json").read_text())
    assert results["complete"] and [row["name"] for row in results["rows"]] == ["wanda-50%/full-distill/4x"]
    row = results["rows"][0]
    assert [point["tokens"] for point in row["curve"]] == [0, 256, 512, 768, 1024]
    assert row["recovery"]["sparsity_after"] == row["recovery"]["sparsity_before"] == 0.5
    assert list(row["ppl"]) == ["wiki", "news"]  # the training text first, then one never trained on
    assert row["x_dense"]["news"] == pytest.approx(row["ppl"]["news"] / results["dense"]["ppl"]["news"])
    assert set(row["meets"]) == {"x_dense_text", "minutes", "peak_rss"}
    assert (out / "recover.png").read_bytes().startswith(b"\x89PNG")

    # --keep-rows: a second run adds its row to the file; one with other settings is refused before any work
    bench.main(["--quick", "--out", str(out), "--prunes", "wanda-50%", "--rows", "lora-lm/1x", "--keep-rows"])
    names = [row["name"] for row in json.loads((out / "recover.json").read_text())["rows"]]
    assert names == ["wanda-50%/full-distill/4x", "wanda-50%/lora-lm/1x"]
    with pytest.raises(SystemExit, match="budgets"):
        bench.main(["--quick", "--out", str(out), "--prunes", "wanda-50%", "--rows", "lora-lm/1x", "--keep-rows",
                    "--steps", "3"])


def test_masks_found_from_zeros_or_refused_on_an_unpruned_model():
    model = tiny_model("llama")
    with pytest.raises(LLMPruneError, match="masks=\\{\\}"):
        train_recovery(model, random_windows(4), None, RecoverConfig(params="full", steps=1, batch=2, seqlen=32))
    masks = prune_rows(model)
    stats = train_recovery(model, random_windows(4), None,
                           RecoverConfig(params="full", steps=2, batch=2, seqlen=32, lr=1e-3), progress=False)
    modules = dict(model.named_modules())
    assert all(torch.equal(modules[name].weight != 0, mask) for name, mask in masks.items())
    assert stats["trained_parameters"] == sum(modules[name].weight.numel() for name in masks)  # no biases in Llama


@pytest.mark.parametrize("lr, warns", [(5.0, True), (0.01, False)])
def test_rising_validation_perplexity_is_reported_with_a_lower_rate(lr, warns, capsys):
    """A run that makes validation worse than where it started (a rate too high for the model) says so and names a
    tenth of the rate; one that improves says nothing. Here the 'model' is one weight near its optimum 1: Adam's
    first step moves it by about lr, so lr 5 throws it far off and lr 0.01 brings it closer."""
    weight = torch.nn.Parameter(torch.tensor(0.9))
    result = train_loop([weight], torch.zeros(3, 1, dtype=torch.long), lambda _: (weight - 1) ** 2, lr=lr,
                        tokens_per_step=1, validate=lambda: 1 + float(weight.detach() - 1) ** 2, eval_every=1,
                        progress=False)
    err = capsys.readouterr().err
    assert (result["curve"][-1]["val_ppl"] > 1.1 * result["curve"][0]["val_ppl"]) == warns
    assert ("raised validation perplexity" in err) == warns
    if warns:
        assert err.count("warning") == 1 and f"--recover-lr {lr / 10:g}" in err
