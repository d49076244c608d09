"""Mixture-of-experts pruning on tiny random models of six families, against independent float64 computations.

The tests read each family's experts through their own table below (orientation, gate/up order, activation),
not through llmprune's layout reading, and take the routing from the model's own router."""

import copy
import dataclasses

import pytest
import torch

from llmprune import PruneConfig, prune
from llmprune.errors import LLMPruneError
from llmprune.report import Report
from llmprune.output.summary import format_summary
from moe_models import FAMILIES, tiny_moe, moe_tokens

# family -> (experts stored (experts, in, out), gate and up rows interleaved, activation)
LAYOUTS = {family: (False, False, "silu_glu") for family in FAMILIES} | {"gpt_oss": (True, True, "gpt_oss")}
SPARSITY = 0.5


def moe_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if hasattr(getattr(layer, "mlp", None), "experts")]


def router_of(model, i):
    mlp = model.model.layers[i].mlp
    return mlp.router if hasattr(mlp, "router") else mlp.gate


def expert_weights(model, family, i, expert):
    """Expert `expert` of layer i in float64: (gate_up as [gate; up] rows (out, in), its bias, down (out, in),
    its bias), read with this file's own layout table."""
    transposed, interleaved, _ = LAYOUTS[family]
    experts = model.model.layers[i].mlp.experts
    gate_up, down = experts.gate_up_proj[expert].double(), experts.down_proj[expert].double()
    gate_up_bias = getattr(experts, "gate_up_proj_bias", None)
    gate_up_bias = None if gate_up_bias is None else gate_up_bias[expert].double()
    if transposed:
        gate_up, down = gate_up.t(), down.t()
    if interleaved:
        gate_up = torch.cat([gate_up[0::2], gate_up[1::2]])
        gate_up_bias = torch.cat([gate_up_bias[0::2], gate_up_bias[1::2]])
    return gate_up, gate_up_bias, down


def intermediate64(model, family, gate_up, bias, x):
    h = x @ gate_up.t() + (0 if bias is None else bias)
    gate, up = h.chunk(2, dim=-1)
    if LAYOUTS[family][2] == "gpt_oss":  # clamped SwiGLU with (up + 1), alpha and limit from the config
        limit, alpha = model.config.swiglu_limit, model.config.swiglu_alpha
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(alpha * gate)
    return torch.nn.functional.silu(gate) * up


def routed_inputs(model, i, ids, batch_size=4):
    """The router's input at layer i (= the experts' input) and its chosen experts, over the calibration batches."""
    seen = []
    handle = router_of(model, i).register_forward_hook(lambda m, args, out: seen.append((args[0], out[2])))
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            model(ids[start : start + batch_size])
    handle.remove()
    hidden = torch.cat([h.reshape(-1, h.shape[-1]) for h, _ in seen]).double()
    chosen = torch.cat([c.reshape(len(h.reshape(-1, h.shape[-1])), -1) for h, c in seen])
    return hidden, chosen


def wanda64(weight, norms, sparsity):
    """Per row, the floor(in * s + 0.5) lowest |W| * ||X|| pruned (a stable sort breaks ties by position)."""
    count = int(weight.shape[1] * sparsity + 0.5)
    order = (weight.abs() * norms).argsort(dim=1, stable=True)
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep.scatter_(1, order[:, :count], False)
    return keep


def only(i):
    """--skip keeping everything dense but the routed experts of layer i."""
    return rf"^(?!model\.layers\.{i}\.mlp\.experts\.)"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["routed", "all-tokens", "magnitude"])
def test_expert_pruned_by_wanda_equals_float64_brute_force(family, mode):
    """Each expert of the last MoE layer, pruned alone: its mask is Wanda over exactly the tokens its router sent
    it (or over all of the layer's tokens, or by magnitude, for an expert made rare), and the report's token
    counts are the router's."""
    model = tiny_moe(family)
    ids = moe_tokens()
    i = moe_layers(model)[-1]
    dense = copy.deepcopy(model)
    hidden, chosen = routed_inputs(dense, i, ids)
    min_tokens = {"routed": 1, "all-tokens": 10**6, "magnitude": 10**6}[mode]
    report = prune(model, ids, PruneConfig(method="wanda", sparsity=SPARSITY, batch_size=4, skip=only(i),
                                           min_expert_tokens=min_tokens,
                                           rare_experts="magnitude" if mode == "magnitude" else "all-tokens"),
                   progress=False)
    block = report.moe["blocks"][f"model.layers.{i}.mlp.experts"]
    counts = [int((chosen == e).sum()) for e in range(block["experts"])]
    assert block["tokens"] == counts and sum(counts) == chosen.numel()
    assert block["rare"] == ([] if mode == "routed" else list(range(block["experts"])))
    for expert in range(block["experts"]):
        x = hidden[(chosen == expert).any(-1)] if mode == "routed" else hidden
        gate_up, bias, down = expert_weights(dense, family, i, expert)
        inner = intermediate64(dense, family, gate_up, bias, x)
        ones_in, ones_mid = torch.ones(gate_up.shape[1], dtype=torch.float64), torch.ones(down.shape[1],
                                                                                          dtype=torch.float64)
        norms_in = ones_in if mode == "magnitude" else x.square().sum(0).sqrt()
        norms_mid = ones_mid if mode == "magnitude" else inner.square().sum(0).sqrt()
        got_gate_up, _, got_down = expert_weights(model, family, i, expert)
        for got, weight, norms in ((got_gate_up, gate_up, norms_in), (got_down, down, norms_mid)):
            torch.testing.assert_close(got, weight * wanda64(weight, norms, SPARSITY), rtol=0, atol=0)
    assert len(report.layers) == 0  # everything else was kept dense by --skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_expert_statistics_are_float64_brute_force(family):
    """Per expert: the Hessian of its input and of its intermediate activation over the tokens routed to it."""
    from llmprune.inputs.models import decoder_layers
    from llmprune.pruning.experts import collect_expert_statistics, find_expert_blocks
    from llmprune.pruning.runner import capture_layer_calls, propagate

    model = tiny_moe(family)
    ids = moe_tokens()
    i = moe_layers(model)[0]
    hidden, chosen = routed_inputs(model, i, ids)
    _, layers = decoder_layers(model)
    calls = capture_layer_calls(model, layers, ids, 4, torch.device("cpu"), progress=False)
    with torch.no_grad():
        for j in range(i):
            propagate(layers[j], j, calls)
        blocks = find_expert_blocks(layers[i], f"model.layers.{i}", model.config.hidden_size)
        collected = collect_expert_statistics(layers[i], i, calls, blocks, ("hessian", "input_norms"), 1, "all-tokens")
    assert [b.name for b in blocks] == [f"model.layers.{i}.mlp.experts"]
    _, finals = collected[blocks[0].name]
    for expert in range(blocks[0].num_experts):
        x = hidden[(chosen == expert).any(-1)]
        gate_up, bias, _ = expert_weights(model, family, i, expert)
        inner = intermediate64(model, family, gate_up, bias, x)
        for reads, inputs in (("hidden", x), ("intermediate", inner)):
            torch.testing.assert_close(finals[(expert, reads)]["hessian"].double(), 2 * inputs.t() @ inputs / len(x),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", "unstructured")])
def test_every_expert_matrix_reaches_target_and_model_reloads(family, method, pattern, tmp_path):
    """Every expert's every matrix carries the pattern (read straight from the 3-D parameters); the pruned model
    runs its own forward, and saves and reloads with from_pretrained to the same logits."""
    model = tiny_moe(family)
    ids = moe_tokens()
    report = prune(model, ids, PruneConfig(method=method, pattern=pattern, batch_size=4, min_expert_tokens=1),
                   progress=False)
    checked = 0
    for i in moe_layers(model):
        for expert in range(model.model.layers[i].mlp.experts.gate_up_proj.shape[0]):
            gate_up, _, down = expert_weights(model, family, i, expert)
            for weight, parts in ((gate_up, gate_up.chunk(2)), (down, [down])):
                if pattern == "2:4":
                    assert bool(((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
                else:  # SparseGPT compares a whole matrix: gate, up and down each lose exactly half
                    assert all(int((part == 0).sum()) == part.numel() // 2 for part in parts)
                checked += 1
    assert checked == 2 * len(moe_layers(model)) * 4 == len(report.moe["experts"])
    assert abs(report.achieved_sparsity - 0.5) < 1e-3
    with torch.no_grad():
        logits = model(ids[:2]).logits
    assert bool(torch.isfinite(logits).all())
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids[:2]).logits, logits, rtol=1e-5, atol=1e-5)


def test_report_counts_every_kind_of_weight():
    """Qwen2-MoE: attention, routed experts and the shared expert pruned; the router and the shared expert's gate
    dense; their parameter counts from the model itself; nothing unaccounted; the summary says so."""
    model = tiny_moe("qwen2_moe")
    report = prune(model, moe_tokens(), PruneConfig(method="wanda", sparsity=SPARSITY, batch_size=4,
                                                    min_expert_tokens=1), progress=False)
    named = dict(model.model.layers.named_parameters())
    total = lambda *parts: sum(p.numel() for n, p in named.items() if any(s in n for s in parts) and p.dim() >= 2)
    kinds = report.coverage["kinds"]
    assert kinds["experts"]["pruned"] == total("experts.gate_up_proj", "experts.down_proj")
    assert kinds["shared"]["pruned"] == total("shared_expert.")
    assert kinds["attention"]["pruned"] == total("self_attn")
    assert kinds["router"] == {"pruned": 0, "zeros": 0, "dense": total("mlp.gate.", "shared_expert_gate"),
                               "dense_by": {"router": total("mlp.gate.", "shared_expert_gate")}}
    for kind in ("experts", "shared", "attention"):
        assert kinds[kind]["zeros"] == kinds[kind]["pruned"] // 2
    assert report.coverage["unaccounted"] == []
    assert not bool((model.model.layers[0].mlp.shared_expert_gate.weight == 0).any())
    summary = format_summary(_as_report(report))
    assert "router: dense" in summary and "WARNING" not in summary
    assert "and 16 expert matrices" in summary


def test_unknown_weight_is_reported_not_skipped_silently():
    """A 3-D weight of a layout llmprune does not know stays dense, and the report and summary name it."""
    model = tiny_moe("mixtral")
    experts = model.model.layers[1].mlp.experts
    experts.mystery_proj = torch.nn.Parameter(torch.randn(4, 8, 8))
    report = prune(model, moe_tokens(), PruneConfig(method="magnitude", sparsity=SPARSITY), progress=False)
    assert report.coverage["unaccounted"] == ["model.layers.1.mlp.experts.mystery_proj"]
    assert "WARNING: 1 weights" in format_summary(_as_report(report))


def test_rare_experts_are_named_in_the_summary():
    model = tiny_moe("olmoe")
    report = prune(model, moe_tokens(), PruneConfig(method="wanda", sparsity=SPARSITY, batch_size=4,
                                                    min_expert_tokens=60, rare_experts="magnitude"), progress=False)
    blocks = report.moe["blocks"]
    rare = {name: [e for e, n in enumerate(b["tokens"]) if n < 60] for name, b in blocks.items()}
    assert any(rare.values()) and not all(len(r) == 4 for r in rare.values())
    assert {name: b["rare"] for name, b in blocks.items()} == rare
    summary = format_summary(_as_report(report))
    for name, experts in rare.items():
        if experts:
            assert f"statistics: magnitude) of {name}: {experts}" in summary
    sources = {(r["name"], r["expert"]): r["statistics"] for r in report.moe["experts"]}
    assert all(sources[(f"{name}.down_proj", e)] == "magnitude" for name, es in rare.items() for e in es)


def test_misread_layout_fails_loudly():
    """A gate function that is not what the module computes: the recomputed output differs, and the run stops."""
    model = tiny_moe("mixtral")
    model.config._experts_implementation = "eager"  # the module's own loop, which does not call _apply_gate
    experts = model.model.layers[0].mlp.experts
    experts._apply_gate = lambda out: torch.nn.functional.gelu(out.chunk(2, dim=-1)[0]) * out.chunk(2, dim=-1)[1]
    with pytest.raises(LLMPruneError, match="experts"):
        prune(model, moe_tokens(), PruneConfig(method="wanda", sparsity=SPARSITY, batch_size=4), progress=False)


@pytest.mark.parametrize("settings,message", [({"min_expert_tokens": 0}, "--min-expert-tokens"),
                                              ({"rare_experts": "drop"}, "--rare-experts")])
def test_bad_expert_settings(settings, message):
    with pytest.raises(LLMPruneError, match=message):
        PruneConfig(**settings)


def _as_report(pruned) -> Report:
    d = pruned.to_dict()
    return Report.from_dict({"model": "tiny", "model_name": "tiny", "architecture": "moe", "method": d["method"],
                             "sparsity": d["sparsity"], "pattern": d["pattern"], "allocation": d["allocation"],
                             "achieved_sparsity": d["achieved_sparsity"], "layers": d["layers"],
                             "layer_sparsity": d["layer_sparsity"], "moe": d["moe"], "coverage": d["coverage"]})


def test_pipeline_reports_experts_and_writes_a_loadable_model(tmp_path, tiny_dir):
    """A whole run on a tiny Mixtral directory: report.json carries the experts' token counts and the per-kind
    coverage, the summary counts the expert matrices, and the output loads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    from llmprune import pipeline
    from llmprune.config import RunConfig
    from moe_models import save_tiny_moe_dir

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(3000)))
    source = save_tiny_moe_dir(tmp_path / "moe", "mixtral", tiny_dir)
    out = tmp_path / "out"
    report = pipeline.run(RunConfig(model=str(source), prune=PruneConfig(method="wanda", nsamples=4, seqlen=16,
                                                                         min_expert_tokens=4),
                                    calib=f"file:{text}", eval=f"file:{text}", eval_windows=2, output=str(out)),
                          progress=False)
    saved = Report.load(out / "report.json")
    assert saved.moe == report.moe and sum(saved.moe["blocks"]["model.layers.0.mlp.experts"]["tokens"]) == 4 * 16 * 2
    assert saved.coverage["kinds"]["experts"]["zeros"] * 2 == saved.coverage["kinds"]["experts"]["pruned"]
    assert abs(saved.achieved_sparsity - 0.5) < 1e-3
    assert "expert matrices" in format_summary(saved)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert float((pruned.model.layers[1].mlp.experts.down_proj == 0).float().mean()) == 0.5


def test_listed_experts_are_pruned_as_the_fused_ones():
    """Older layout (a list of per-expert nn.Linear MLPs): the same function as the fused Mixtral, so Wanda gives
    every expert the same weights; an expert never routed to is rare and takes all of the layer's tokens."""
    from moe_models import listed_mixtral

    ids = moe_tokens()
    fused, listed = tiny_moe("mixtral"), listed_mixtral()
    with torch.no_grad():
        torch.testing.assert_close(listed(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-5)
    config = PruneConfig(method="wanda", sparsity=SPARSITY, batch_size=4, min_expert_tokens=1)
    fused_report, listed_report = (prune(m, ids, config, progress=False) for m in (fused, listed))
    assert len(listed_report.layers) == len(fused_report.layers) == 8  # attention; the routers stay dense
    assert [b["tokens"] for b in listed_report.moe["blocks"].values()] == \
        [b["tokens"] for b in fused_report.moe["blocks"].values()]
    for i in range(2):
        for e in range(4):
            expert = listed.model.layers[i].mlp.experts[e]
            gate_up, _, down = expert_weights(fused, "mixtral", i, e)
            torch.testing.assert_close(torch.cat([expert.w1.weight, expert.w3.weight]).double(), gate_up)
            torch.testing.assert_close(expert.w2.weight.double(), down)
    assert listed_report.coverage["unaccounted"] == [] and listed_report.coverage["kinds"]["router"]["dense"] == 256

    banned, reference = listed_mixtral(banned={1: [3]}), tiny_moe("mixtral")
    rare = PruneConfig(method="wanda", sparsity=SPARSITY, batch_size=4, min_expert_tokens=1, skip=only(1))
    report = prune(banned, ids, rare, progress=False)
    prune(reference, ids, dataclasses.replace(rare, min_expert_tokens=10**6), progress=False)
    assert report.moe["blocks"]["model.layers.1.mlp.experts"]["tokens"][3] == 0
    assert report.moe["blocks"]["model.layers.1.mlp.experts"]["rare"] == [3]
    expert = banned.model.layers[1].mlp.experts[3]
    gate_up, _, down = expert_weights(reference, "mixtral", 1, 3)
    torch.testing.assert_close(torch.cat([expert.w1.weight, expert.w3.weight]).double(), gate_up)
    torch.testing.assert_close(expert.w2.weight.double(), down)


class MaskedRouterLogits(torch.overrides.TorchFunctionMode):
    """Minus infinity on the removed experts' router logits, wherever a router's weight enters a linear."""

    def __init__(self, removed: dict):  # {router weight tensor: [expert indices]}
        super().__init__()
        self.removed = removed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.linear:
            for weight, experts in self.removed.items():
                if args[1] is weight:
                    out = out.clone()
                    out[..., experts] = float("-inf")
        return out


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("importance", ["reap", "frequency"])
def test_removing_experts_equals_masking_their_router_logits(family, importance, tmp_path):
    """--structure experts: the smaller model computes what the original computes with the removed experts' router
    logits at minus infinity; frequency scores are the router's own counts and REAP scores a float64 recomputation;
    the smaller model saves and reloads with from_pretrained."""
    from llmprune.pruning.expert_removal import remove_experts

    overrides = {"n_group": 1, "topk_group": 1} if family == "deepseek_v3" else {}
    model = tiny_moe(family, **overrides)
    original = copy.deepcopy(model)
    ids = moe_tokens()
    record = remove_experts(model, ids, PruneConfig(structure="experts", sparsity=0.25, expert_importance=importance,
                                                    batch_size=4))
    assert record["units_before"] == 4 and record["units_kept"] == 3
    for i in moe_layers(original):
        name = f"model.layers.{i}.mlp.experts"
        hidden, chosen = routed_inputs(original, i, ids)
        tokens = [int((chosen == e).sum()) for e in range(4)]
        assert record["scores"][name]["tokens"] == tokens
        if importance == "frequency":
            assert record["removed_experts"][name] == [min(range(4), key=lambda e: (tokens[e], e))]
        else:
            reap = reap64(original, family, i, ids)
            torch.testing.assert_close(torch.tensor(record["scores"][name]["reap"], dtype=torch.float64), reap,
                                       rtol=1e-5, atol=1e-7)
            assert record["removed_experts"][name] == [int(reap.argmin())]
        assert model.model.layers[i].mlp.experts.gate_up_proj.shape[0] == 3
    removed = {router_of(original, i).weight: record["removed_experts"][f"model.layers.{i}.mlp.experts"]
               for i in moe_layers(original)}
    with torch.no_grad():
        with MaskedRouterLogits(removed):
            expected = original(ids[:4]).logits
        smaller = model(ids[:4]).logits
        assert not torch.allclose(original(ids[:4]).logits, expected, atol=1e-4)  # the removed experts mattered
        torch.testing.assert_close(smaller, expected, rtol=1e-5, atol=1e-5)
        model.save_pretrained(tmp_path)
        reloaded = type(model).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(ids[:4]).logits, smaller, rtol=1e-5, atol=1e-5)
    assert set(record["config_changes"].values()) == {3}


def reap64(model, family, i, ids):
    """REAP per expert in float64: mean over routed tokens of routing weight x ||expert output||."""
    seen = []
    handle = router_of(model, i).register_forward_hook(lambda m, args, out: seen.append((args[0], out[1], out[2])))
    with torch.no_grad():
        for start in range(0, len(ids), 4):
            model(ids[start : start + 4])
    handle.remove()
    hidden = torch.cat([h.reshape(-1, h.shape[-1]) for h, _, _ in seen]).double()
    weights = torch.cat([w.reshape(len(h.reshape(-1, h.shape[-1])), -1) for h, w, _ in seen]).double()
    chosen = torch.cat([c.reshape(len(h.reshape(-1, h.shape[-1])), -1) for h, _, c in seen])
    experts = model.model.layers[i].mlp.experts
    scores = []
    for e in range(4):
        token, slot = torch.where(chosen == e)
        with torch.no_grad():
            gate_up, bias, down = expert_weights(model, family, i, e)
            out = intermediate64(model, family, gate_up, bias, hidden[token]) @ down.t()
            if getattr(experts, "down_proj_bias", None) is not None:
                out = out + experts.down_proj_bias[e].double()
        scores.append(float((weights[token, slot] * out.norm(dim=-1)).sum() / max(1, len(token))))
    return torch.tensor(scores, dtype=torch.float64)


def test_pipeline_removes_experts_and_writes_an_ordinary_smaller_model(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    from llmprune import pipeline
    from llmprune.config import RunConfig
    from moe_models import save_tiny_moe_dir

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(3000)))
    source = save_tiny_moe_dir(tmp_path / "moe", "qwen3_moe", tiny_dir)
    out = tmp_path / "out"
    report = pipeline.run(RunConfig(model=str(source), prune=PruneConfig(structure="experts", sparsity=0.5,
                                                                         expert_importance="frequency", nsamples=4,
                                                                         seqlen=16),
                                    calib=f"file:{text}", eval=f"file:{text}", eval_windows=2, output=str(out)),
                          progress=False)
    assert report.structure.units_kept == 2 and report.structure.config_changes == {"num_local_experts": 2}
    assert [len(layer.removed) for layer in report.structure.layers] == [2, 2]
    assert "removed 2 of 4 experts per layer" in format_summary(Report.load(out / "report.json"))
    smaller = AutoModelForCausalLM.from_pretrained(out)
    assert smaller.config.num_experts == 2 and smaller.model.layers[0].mlp.gate.weight.shape[0] == 2


@pytest.mark.parametrize("settings,message", [
    ({"structure": "experts", "method": "wanda"}, "--expert-importance"),
    ({"structure": "experts", "expert_importance": "random"}, "--expert-importance"),
    ({"structure": "experts", "remove_params": 0.2}, "--remove-params")])
def test_bad_expert_removal_settings(settings, message):
    with pytest.raises(LLMPruneError, match=message):
        PruneConfig(**settings)


def test_expert_removal_refuses_what_it_cannot_express():
    from llmprune.pruning.expert_removal import remove_experts

    with pytest.raises(LLMPruneError, match="fewer than the 2"):
        remove_experts(tiny_moe("mixtral"), moe_tokens(), PruneConfig(structure="experts", sparsity=0.75))
    with pytest.raises(LLMPruneError, match="from 1 of 2 groups"):
        remove_experts(tiny_moe("deepseek_v3"), moe_tokens(), PruneConfig(structure="experts", sparsity=0.5))
    with pytest.raises(LLMPruneError, match="each of the 4 routing groups"):
        remove_experts(tiny_moe("deepseek_v3", n_routed_experts=8, n_group=4, topk_group=4), moe_tokens(),
                       PruneConfig(structure="experts", sparsity=0.5))
    from tiny_models import tiny_model
    with pytest.raises(LLMPruneError, match="has none"):
        remove_experts(tiny_model("llama"), moe_tokens(), PruneConfig(structure="experts", sparsity=0.5))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_orientation_from_shapes_without_the_modules_flag(family):
    """Experts without transformers' `is_transposed` flag (remote code): the shapes against the hidden size decide,
    and the pruned experts are the same as with the flag."""
    from llmprune.pruning.experts import find_expert_blocks

    flagged, bare = tiny_moe(family), tiny_moe(family)
    bare.config._experts_implementation = "eager"  # the family's own loop, which reads no flag
    for layer in bare.model.layers:
        del layer.mlp.experts.is_transposed
    blocks = find_expert_blocks(bare.model.layers[0], "model.layers.0", bare.config.hidden_size)
    assert {m.transposed for m in blocks[0].matrices} == {LAYOUTS[family][0]}
    config = PruneConfig(method="wanda", sparsity=SPARSITY, batch_size=4, min_expert_tokens=1)
    for model in (flagged, bare):
        prune(model, moe_tokens(), config, progress=False)
    for name, value in flagged.state_dict().items():
        assert torch.equal(value, bare.state_dict()[name]), name


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "gemma3"])
def test_dense_models_account_for_every_weight(family):
    """Dense families: every 2-D weight of the decoder layers is a pruned linear or skipped, by kind."""
    from tiny_models import VOCAB, tiny_model

    model = tiny_model(family)
    report = prune(model, torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0)),
                   PruneConfig(method="wanda", sparsity=SPARSITY, batch_size=4, skip="attn|attention"),
                   progress=False)
    kinds = report.coverage["kinds"]
    assert report.coverage["unaccounted"] == [] and set(kinds) == {"attention", "mlp"}
    assert kinds["mlp"]["pruned"] == sum(r["numel"] for r in report.layers) and kinds["mlp"]["dense"] == 0
    assert kinds["attention"]["pruned"] == 0 and kinds["attention"]["dense_by"] == {"skipped": kinds["attention"]["dense"]}


def test_nm_pattern_that_an_expert_cannot_take_fails_before_any_work():
    model = tiny_moe("qwen3_moe", moe_intermediate_size=26)
    with pytest.raises(LLMPruneError, match=r"experts.down_proj has 26 inputs per expert"):
        prune(model, None, PruneConfig(method="wanda", pattern="2:4"), progress=False)


@pytest.mark.parametrize("structure", ["none", "experts"])
def test_moe_prune_composes_with_distillation(tmp_path, tiny_dir, structure):
    """Unstructured or expert removal, then distillation: the run completes and the zeros of the pruned linears
    and experts stay zeros (the experts are not trained by recovery)."""
    from llmprune import pipeline
    from llmprune.config import RecoverConfig, RunConfig
    from moe_models import save_tiny_moe_dir

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(6000)))
    source = save_tiny_moe_dir(tmp_path / "moe", "qwen2_moe", tiny_dir)
    prune_config = (PruneConfig(structure="experts", sparsity=0.25, nsamples=4, seqlen=16) if structure == "experts"
                    else PruneConfig(method="wanda", nsamples=4, seqlen=16, min_expert_tokens=4))
    report = pipeline.run(RunConfig(model=str(source), prune=prune_config, calib=f"file:{text}",
                                    eval=f"file:{text}", eval_windows=2, recover="distill",
                                    recovery=RecoverConfig(steps=2, batch=1, seqlen=16), output=str(tmp_path / "out")),
                          progress=False)
    assert report.perplexity.recovered is not None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    experts = model.model.layers[0].mlp.experts
    if structure == "experts":
        assert experts.gate_up_proj.shape[0] == 3
    else:
        assert float((experts.down_proj == 0).float().mean()) == 0.5
        assert float((model.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) == 0.5


@pytest.mark.parametrize("importance", ["reap", "frequency"])
def test_grouped_routing_loses_the_same_number_of_experts_per_group(importance):
    """DeepSeek-V3 routes within n_group fixed groups: the lowest expert of each group goes, and the smaller model
    computes what the original computes with those router logits at minus infinity."""
    from llmprune.pruning.expert_removal import remove_experts

    model = tiny_moe("deepseek_v3", n_routed_experts=8, n_group=2, topk_group=1)
    original = copy.deepcopy(model)
    ids = moe_tokens()
    record = remove_experts(model, ids, PruneConfig(structure="experts", sparsity=0.25, expert_importance=importance,
                                                    batch_size=4))
    assert record["units_kept"] == 6 and record["groups"] == 2
    for name, removed in record["removed_experts"].items():
        values = record["scores"][name]["tokens" if importance == "frequency" else "reap"]
        assert removed == [min(range(g, g + 4), key=lambda e: (values[e], e)) for g in (0, 4)]
    removed = {router_of(original, i).weight: record["removed_experts"][f"model.layers.{i}.mlp.experts"]
               for i in moe_layers(original)}
    with torch.no_grad():
        with MaskedRouterLogits(removed):
            expected = original(ids[:4]).logits
        torch.testing.assert_close(model(ids[:4]).logits, expected, rtol=1e-5, atol=1e-5)


def test_experts_removed_then_the_rest_pruned_unstructured(tmp_path, tiny_dir):
    """Two ordinary runs compose: --structure experts writes a smaller MoE, and Wanda then prunes what remains,
    experts included, from that model's own routed tokens."""
    from llmprune import pipeline
    from llmprune.config import RunConfig
    from moe_models import save_tiny_moe_dir
    from transformers import AutoModelForCausalLM

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(6000)))
    source = save_tiny_moe_dir(tmp_path / "moe", "qwen2_moe", tiny_dir)
    common = {"calib": f"file:{text}", "eval": "none"}
    pipeline.run(RunConfig(model=str(source), prune=PruneConfig(structure="experts", sparsity=0.25, nsamples=4,
                                                                seqlen=16), output=str(tmp_path / "fewer"), **common),
                 progress=False)
    report = pipeline.run(RunConfig(model=str(tmp_path / "fewer"), prune=PruneConfig(
        method="wanda", nsamples=4, seqlen=16, min_expert_tokens=1), output=str(tmp_path / "sparse"), **common),
        progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape[0] == 3  # of 4: the removal stayed
    assert float((experts.gate_up_proj == 0).float().mean()) == 0.5
    assert report.coverage["kinds"]["experts"]["pruned"] > 0
