"""--structure hidden surgery (llmprune/pruning/structured/hidden.py) on tiny random models.

The independent check: a Llama whose removed channels are exactly zero in the embeddings and in every weight
that writes the residual stream (o_proj, down_proj rows) carries zeros in those channels of the stream at every
point, so the norms output zeros there and the readers' columns there multiply zeros. What differs is only the
RMS norms' mean over the hidden size: with epsilon 0, the sliced model equals the original (a) exactly when
every norm's gain is multiplied by sqrt(hidden / width) (rescale_norms), and (b) without the rescale, equals the
original model whose norm gains were multiplied by sqrt(width / hidden). Logits are compared with the original
model's own forward."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llmprune import LLMPruneError
from llmprune.pruning.structured.hidden import (_gain_offset, activation_importance, choose_width, hidden_widths,
                                                kept_channels, magnitude_importance, parameters_at_width, plan_hidden,
                                                prune_hidden, remove_hidden_channels, window_mean_abs)
from tiny_models import VOCAB, tiny_model

HIDDEN, WIDTH = 64, 48


def tokens(n=4, seqlen=12, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def zero_channel_llama(tied: bool, eps: float = 0.0):
    """A tiny Llama (4 heads of 16, hidden 64) whose channels `removed` are zero wherever the stream is written."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                         rms_norm_eps=eps, tie_word_embeddings=tied)).eval()
    removed = torch.randperm(HIDDEN)[:HIDDEN - WIDTH]
    with torch.no_grad():
        for name, module in model.named_modules():  # random norm gains: a slice in the wrong place would show
            if name.endswith("norm"):
                module.weight.uniform_(0.5, 1.5)
        model.model.embed_tokens.weight[:, removed] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[removed] = 0
            layer.mlp.down_proj.weight[removed] = 0
    return model, removed


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


@pytest.mark.parametrize("tied", [False, True])
def test_zero_channels_removed_exactly_with_rescaled_norms(tied, tmp_path):
    model, removed = zero_channel_llama(tied)
    ids = tokens(2, seed=5)
    expected = logits(model, ids)
    pruned = copy.deepcopy(model)
    record = prune_hidden(pruned, tokens(), width=WIDTH, round_to=16)
    assert sorted(set(range(HIDDEN)) - set(record["kept"])) == sorted(removed.tolist())  # importance 0 there
    assert pruned.model.embed_tokens.weight.shape == (VOCAB, WIDTH)
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (64, WIDTH)  # 4 heads of 16 kept
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (WIDTH, 96)
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tied
    assert logits(pruned, ids) == pytest.approx(expected, abs=1e-5)
    # stock from_pretrained rebuilds it from the saved config: hidden 48, head_dim stated, rotary unchanged
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.hidden_size, loaded.config.head_dim) == (WIDTH, 16)
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert logits(loaded, ids) == pytest.approx(expected, abs=1e-5)


def test_slicing_alone_scales_rms_norms_by_sqrt_width_over_hidden():
    model, removed = zero_channel_llama(tied=False)
    ids = tokens(2, seed=5)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name.endswith("norm"):
                module.weight.mul_(math.sqrt(WIDTH / HIDDEN))
    sliced = copy.deepcopy(model)
    keep = torch.tensor(sorted(set(range(HIDDEN)) - set(removed.tolist())))
    remove_hidden_channels(sliced, plan_hidden(model, WIDTH), keep, rescale_norms=False)
    assert logits(sliced, ids) == pytest.approx(logits(reference, ids), abs=1e-5)
    assert not logits(sliced, ids) == pytest.approx(logits(model, ids), abs=1e-3)  # the scale matters


def test_magnitude_keeps_the_channels_with_weight():
    model, removed = zero_channel_llama(tied=False)
    with torch.no_grad():  # zero the removed channels in every tensor that holds them: magnitude sees only those
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")):
                module.weight[:, removed] = 0
            elif name.endswith("norm"):
                module.weight[removed] = 0
    record = prune_hidden(model, None, width=WIDTH, round_to=16, importance="magnitude")
    assert sorted(set(range(HIDDEN)) - set(record["kept"])) == sorted(removed.tolist())


def test_nonzero_epsilon_stays_close():
    model, _ = zero_channel_llama(tied=False, eps=1e-6)
    ids = tokens(2, seed=5)
    pruned = copy.deepcopy(model)
    prune_hidden(pruned, tokens(), width=WIDTH, round_to=16)
    assert logits(pruned, ids) == pytest.approx(logits(model, ids), abs=1e-2)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_shrink_and_reload(family, tmp_path):
    model = tiny_model(family, layers=2)
    ids = tokens(2, seed=3)
    expected_count = parameters_at_width(model, 48)
    record = prune_hidden(model, tokens(), keep_fraction=0.7, round_to=16)
    assert record["width"] == 48 and model.config.hidden_size == 48
    assert sum(p.numel() for p in model.parameters()) == expected_count
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert logits(loaded, ids) == pytest.approx(logits(model, ids), abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_families_deriving_head_size_from_hidden_are_refused(family):
    with pytest.raises(LLMPruneError, match="cannot"):
        prune_hidden(tiny_model(family, layers=1), tokens(), width=48, round_to=16)


def test_widths_follow_round_to_and_the_config():
    model = tiny_model("llama", layers=1)  # 4 heads: LlamaConfig wants hidden a multiple of 4
    assert hidden_widths(model, 16) == [16, 32, 48]
    assert hidden_widths(model, 6) == [12, 24, 36, 48, 60]
    assert choose_width(model, keep_fraction=0.6, round_to=16) == 32  # 38.4: nearest allowed
    assert choose_width(model, keep_fraction=0.625, round_to=16) == 48  # 40: a tie takes the larger
    with pytest.raises(LLMPruneError, match="nearest: 24, 36$"):
        choose_width(model, width=30, round_to=6)
    with pytest.raises(LLMPruneError, match="lower --round-to"):
        choose_width(model, keep_fraction=0.5, round_to=64)
    with pytest.raises(LLMPruneError, match="refuses"):
        plan_hidden(model, 30)


def test_magnitude_importance_by_brute_force():
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(3, 4, generator=g), torch.randn(4, generator=g), torch.randn(4, 4, generator=g)
    got = magnitude_importance([(a, (1,)), (b, (0,)), (c, (0, 1))], 4)
    for j in range(4):
        total = sum(float(a[i, j]) ** 2 for i in range(3)) + float(b[j]) ** 2
        total += sum(float(c[j, k]) ** 2 + float(c[k, j]) ** 2 for k in range(4))
        assert float(got[j]) == pytest.approx(math.sqrt(total), rel=1e-12)


def test_activation_aggregation_by_brute_force():
    g = torch.Generator().manual_seed(1)
    acts = [torch.randn(3, 5, 4, generator=g) for _ in range(2)]  # two norms: (windows, tokens, hidden)
    sumsq = [(window_mean_abs(x).double() ** 2).sum(0) for x in acts]
    got = activation_importance(sumsq)
    for j in range(4):
        expected = 0.0
        for x in acts:
            means = [sum(abs(float(x[w, t, j])) for t in range(5)) / 5 for w in range(3)]
            expected += math.sqrt(sum(m * m for m in means))
        assert float(got[j]) == pytest.approx(expected, rel=1e-6)
    assert kept_channels(torch.tensor([3.0, 1.0, 3.0, 2.0]), 2).tolist() == [0, 2]


def test_gain_offset_read_from_the_norm_itself():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert _gain_offset(LlamaRMSNorm(8), 8) == pytest.approx(0, abs=1e-6)
    assert _gain_offset(Gemma3RMSNorm(8), 8) == pytest.approx(1, abs=1e-6)  # (1 + weight) * x / rms
    assert _gain_offset(nn.LayerNorm(8), 8) == pytest.approx(0, abs=1e-6)


def test_bad_requests_fail_early():
    model = tiny_model("llama", layers=1)
    with pytest.raises(LLMPruneError, match="calibration"):
        prune_hidden(model, None, width=48, round_to=16)
    with pytest.raises(LLMPruneError, match="not both"):
        prune_hidden(model, tokens(), keep_fraction=0.5, width=48)
    with pytest.raises(LLMPruneError, match="choose activation or magnitude"):
        prune_hidden(model, tokens(), width=48, importance="taylor")


def test_gemma3_reloads_as_it_is_in_memory(tmp_path):
    """Gemma scales its embeddings by sqrt(hidden), rebuilt from the saved config: the in-memory model follows."""
    model = tiny_model("gemma3", layers=2)
    ids = tokens(2, seed=3)
    prune_hidden(model, tokens(), width=48, round_to=16)
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(48 ** 0.5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert logits(loaded, ids) == pytest.approx(logits(model, ids), abs=1e-5)
