"""Structured pruning: the pruned model is the original with the removed structures zeroed (plus the folded
bias), removed layers are skipped layers, the result loads with stock transformers, scores match hand
computations, compensation preserves the mean output, bad input fails before any work."""

import copy
from dataclasses import replace

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from llmprune.errors import LLMPruneError
from llmprune.inputs.models import decoder_layers, weight_matrix
from llmprune.pruning.structured import StructuredConfig, prune_structured, sparsity_for_params
from llmprune.pruning.structured.importance import UnitView, get_importance
from llmprune.pruning.structured.model_passes import loss_gradients

FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox", "gemma3"]
GQA_FAMILIES = ["llama", "mistral", "qwen2", "gemma3"]  # separate q/k/v/o and an explicit head_dim
MLP_OUTPUT = {"llama": "mlp.down_proj", "mistral": "mlp.down_proj", "qwen2": "mlp.down_proj", "gemma3": "mlp.down_proj",
              "opt": "fc2", "gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}
MLP_INPUTS = {"llama": ["mlp.gate_proj", "mlp.up_proj"], "opt": ["fc1"], "gpt2": ["mlp.c_fc"]}
ATTENTION_OUTPUT = "self_attn.o_proj"
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16  # every tiny GQA model


def calibration(n=4, seqlen=16, seed=1):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def pruned(family, structure, layers=3, **options):
    model = tiny_model(family, layers=layers)
    original = copy.deepcopy(model)
    report = prune_structured(model, calibration(), StructuredConfig(structure=structure, **options), progress=False)
    return original, model, report.structure


def logits(model, ids=None):
    with torch.no_grad():
        return model(calibration(2, 12, seed=7) if ids is None else ids).logits


def zeroed_reference(original, model, report, output_name):
    """The original model with each removed unit's input columns of the output projection zeroed, and the
    bias the pruned model carries beyond the original's added to that projection's output."""
    reference = copy.deepcopy(original)
    _, ref_layers = decoder_layers(reference)
    _, new_layers = decoder_layers(model)
    for entry in report.layers:
        ref_out = ref_layers[entry.index].get_submodule(output_name)
        new_out = new_layers[entry.index].get_submodule(output_name)
        width = weight_matrix(ref_out).shape[1] // report.units_before
        with torch.no_grad():
            for unit in entry.removed:
                weight_matrix(ref_out)[:, unit * width:(unit + 1) * width] = 0
        old_bias = ref_out.bias.detach() if ref_out.bias is not None else 0
        extra = (new_out.bias.detach() - old_bias) if new_out.bias is not None else torch.zeros(())
        ref_out.register_forward_hook(lambda m, a, out, extra=extra: out + extra)
    return reference


@pytest.mark.parametrize("family", FAMILIES)
def test_channels_equal_zeroed_original(family):
    original, model, report = pruned(family, "channels", sparsity=0.3, method="flap", round_to=8)
    kept = {128: 88, 256: 176}[report.units_before]  # 70% of 128 is 89.6, of 256 (GPT-2) 179.2: multiples of 8
    assert report.units_kept == kept
    assert all(len(e.removed) == report.units_before - kept for e in report.layers)
    for layer in decoder_layers(model)[1]:
        assert weight_matrix(layer.get_submodule(MLP_OUTPUT[family])).shape[1] == kept
    reference = zeroed_reference(original, model, report, MLP_OUTPUT[family])
    torch.testing.assert_close(logits(model), logits(reference), atol=2e-5, rtol=1e-4)
    assert report.params_after < report.params_before


@pytest.mark.parametrize("family", GQA_FAMILIES)
@pytest.mark.parametrize("mode", ["query", "groups"])
def test_heads_equal_zeroed_original(family, mode):
    original, model, report = pruned(family, "heads", sparsity=0.5, method="flap", heads_mode=mode)
    heads, kv = (2, 2) if mode == "query" else (2, 1)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (heads, kv, 16)
    if mode == "query":  # one query head removed out of each KV group of two
        assert all(sorted(h // 2 for h in e.removed) == [0, 1] for e in report.layers)
    reference = zeroed_reference(original, model, report, ATTENTION_OUTPUT)
    torch.testing.assert_close(logits(model), logits(reference), atol=2e-5, rtol=1e-4)


def skipping(model, removed):
    """The original model with `removed` layers passing their input through."""
    _, layers = decoder_layers(model)
    for index in removed:
        layers[index].forward = lambda hidden_states, *args, **kwargs: hidden_states
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_removal_equals_skipping(family):
    original, model, report = pruned(family, "layers", layers=4, sparsity=0.5)
    assert len(report.removed_layers) == 2 and len(decoder_layers(model)[1]) == 2
    assert model.config.num_hidden_layers == 2
    if family == "gemma3":  # per-layer lists keep the remaining layers' own entries
        kept = [i for i in range(4) if i not in report.removed_layers]
        assert model.config.layer_types == [original.config.layer_types[i] for i in kept]
    torch.testing.assert_close(logits(model), logits(skipping(original, report.removed_layers)), atol=1e-5,
                               rtol=1e-5)


def test_block_influence_scores_match_hidden_states():
    original, _, report = pruned("llama", "layers", layers=4, sparsity=0.25)
    with torch.no_grad():
        hidden = original(calibration(), output_hidden_states=True).hidden_states
    # hidden_states[i] is layer i's input; the last entry is after the final norm, so score layers 0..2 only
    for i in range(3):
        cos = torch.nn.functional.cosine_similarity(hidden[i].reshape(-1, 64), hidden[i + 1].reshape(-1, 64), dim=-1)
        assert report.layer_scores[i] == pytest.approx(float((1 - cos).mean()), abs=1e-5)


def test_skip_loss_scores_are_loss_increases():
    original, _, report = pruned("llama", "layers", sparsity=0.34, layer_importance="skip_loss")
    ids = calibration()
    with torch.no_grad():
        base = float(original(ids, labels=ids).loss)
        skipped = float(skipping(copy.deepcopy(original), [1])(ids, labels=ids).loss)
    assert report.layer_scores[1] == pytest.approx(skipped - base, abs=1e-5)
    assert report.removed_layers == [min(range(3), key=lambda i: report.layer_scores[i])]


@pytest.mark.parametrize("family,structure,options", [
    ("llama", "channels", {"method": "flap", "round_to": 8}),  # mlp_bias added for compensation
    ("llama", "heads", {"method": "flap"}),  # attention_bias added
    ("gemma3", "layers", {}),
    ("gpt2", "channels", {"method": "wanda", "round_to": 1}),
    ("qwen2", "heads", {"method": "taylor", "heads_mode": "groups"}),
])
def test_saved_model_loads_with_stock_transformers(tmp_path, family, structure, options):
    from transformers import AutoModelForCausalLM

    _, model, report = pruned(family, structure, layers=4, sparsity=0.5, **options)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.num_parameters() == report.params_after < report.params_before
    torch.testing.assert_close(logits(loaded), logits(model))
    for key, value in report.config_changes.items():
        assert getattr(loaded.config, key) == value
    if report.bias_compensation:
        assert loaded.config.mlp_bias if structure == "channels" else loaded.config.attention_bias


@pytest.mark.parametrize("family,structure,options", [("llama", "layers", {}), ("gemma3", "layers", {}),
                                                      ("llama", "heads", {"method": "wanda"}),
                                                      ("mistral", "channels", {"method": "magnitude", "round_to": 1})])
def test_generate_with_kv_cache_matches_full_forward(family, structure, options):
    _, model, _ = pruned(family, structure, layers=4, sparsity=0.5, **options)
    prompt = calibration(1, 5, seed=3)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    ids = prompt
    for _ in range(6):  # greedy without any cache: the model's full forward each step
        ids = torch.cat([ids, logits(model, ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


# Importance functions against hand computations, loop by loop in float64.

def random_view(units=5, per_row=2, inputs=3, outputs=4, per_col=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return UnitView(rows=[r(units, per_row, inputs), r(units, per_row, inputs)], cols=[r(units, outputs, per_col)],
                    input_norms=r(inputs).abs(), channel_norms=r(units, per_col).abs(),
                    channel_variance=r(units, per_col).abs(),
                    row_grads=[r(units, per_row, inputs), r(units, per_row, inputs)], col_grads=[r(units, outputs, per_col)])


def test_importances_match_hand_computation():
    view = random_view()
    d = lambda t: t.double().tolist()
    rows, cols = [d(w) for w in view.rows], [d(w) for w in view.cols]
    row_g, col_g = [d(w) for w in view.row_grads], [d(w) for w in view.col_grads]
    xn, zn, zv = d(view.input_norms), d(view.channel_norms), d(view.channel_variance)
    magnitude, wanda, fluctuation, taylor = [], [], [], []
    for u in range(5):
        sq = wsum = fl = ty = 0.0
        for m in range(2):
            for i in range(2):
                for j in range(3):
                    sq += rows[m][u][i][j] ** 2
                    wsum += abs(rows[m][u][i][j]) * xn[j]
                    ty += abs(rows[m][u][i][j] * row_g[m][u][i][j])
        for o in range(4):
            for c in range(2):
                w = cols[0][u][o][c]
                sq += w ** 2
                wsum += abs(w) * zn[u][c]
                fl += w ** 2 * zv[u][c]
                ty += abs(w * col_g[0][u][o][c])
        magnitude.append(sq ** 0.5)
        wanda.append(wsum)
        fluctuation.append(fl)
        taylor.append(ty)
    mean = sum(fluctuation) / 5
    std = (sum((f - mean) ** 2 for f in fluctuation) / 4) ** 0.5
    expected = {"magnitude": magnitude, "wanda": wanda, "taylor": taylor,
                "flap": [(f - mean) / std for f in fluctuation]}
    for name, values in expected.items():
        torch.testing.assert_close(get_importance(name).fn(view).double(), torch.tensor(values, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5, msg=name)


def captured_inputs(model, module_name, layer=0):
    """Every calibration token's input to one module of the dense model, (tokens, features) float64."""
    module = decoder_layers(model)[1][layer].get_submodule(module_name)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(calibration())
    handle.remove()
    return torch.cat(seen).double()


def test_channel_wanda_selection_matches_hand_scores():
    original, _, report = pruned("llama", "channels", sparsity=0.25, method="wanda", round_to=1)
    layer = decoder_layers(original)[1][0]
    x_norms = captured_inputs(original, "mlp.gate_proj").norm(dim=0)
    z_norms = captured_inputs(original, "mlp.down_proj").norm(dim=0)
    gate, up, down = (weight_matrix(layer.get_submodule(f"mlp.{n}")).double() for n in ("gate_proj", "up_proj", "down_proj"))
    scores = (gate.abs() * x_norms).sum(1) + (up.abs() * x_norms).sum(1) + (down.abs() * z_norms).sum(0)
    assert report.layers[0].removed == sorted(scores.argsort()[:32].tolist())


def test_head_flap_selection_matches_hand_scores():
    original, _, report = pruned("llama", "heads", sparsity=0.5, method="flap", heads_mode="query")
    o_proj = weight_matrix(decoder_layers(original)[1][0].self_attn.o_proj).double()
    variance = captured_inputs(original, "self_attn.o_proj").var(dim=0, unbiased=False)
    per_head = (o_proj.square().sum(0) * variance).reshape(HEADS, HEAD_DIM).sum(1)
    expected = [group * 2 + int(per_head[group * 2 + 1] < per_head[group * 2]) for group in range(KV_HEADS)]
    assert report.layers[0].removed == expected  # the weaker query head of each KV group


def test_taylor_gradients_match_one_full_batch_backward():
    model = tiny_model("llama")
    ids = calibration()
    modules = {"0.down": model.model.layers[0].mlp.down_proj, "2.q": model.model.layers[2].self_attn.q_proj}
    sums = loss_gradients(model, ids, modules, batch_size=3)  # windows split 3 + 1
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # flags restored, nothing kept
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    for name, module in modules.items():
        torch.testing.assert_close(sums[name], module.weight.grad, rtol=1e-4, atol=1e-6)

    gpt2 = tiny_model("gpt2")  # Conv1D stores (in, out): gradients come back as (out, in) like weight_matrix
    conv = {"fc": gpt2.transformer.h[0].mlp.c_fc}
    assert loss_gradients(gpt2, ids, conv, batch_size=4)["fc"].shape == weight_matrix(conv["fc"]).shape


@pytest.mark.parametrize("family,structure,output", [("llama", "channels", "mlp.down_proj"),
                                                      ("gpt2", "channels", "mlp.c_proj"),
                                                      ("gemma3", "heads", "self_attn.o_proj")])
def test_bias_compensation_preserves_mean_output(family, structure, output):
    """Layer 0 sees the same inputs before and after: its output projection's mean over the calibration
    tokens is unchanged with compensation, and changed without (so this test can fail)."""

    def mean_output(model):
        outputs = []
        module = decoder_layers(model)[1][0].get_submodule(output)
        handle = module.register_forward_hook(lambda m, a, out: outputs.append(out.reshape(-1, out.shape[-1])))
        with torch.no_grad():
            model(calibration())
        handle.remove()
        return torch.cat(outputs).double().mean(0)

    options = {"sparsity": 0.5, "method": "magnitude", "round_to": 1}
    original, model, report = pruned(family, structure, bias_compensation=True, **options)
    assert report.bias_compensation
    _, plain, _ = pruned(family, structure, bias_compensation=False, **options)
    dense = mean_output(original)
    shift_compensated = (mean_output(model) - dense).abs().max()
    shift_plain = (mean_output(plain) - dense).abs().max()
    assert shift_compensated < 1e-3 * shift_plain, (shift_compensated, shift_plain)


def test_flap_compensates_by_default_where_the_family_can_carry_it():
    _, llama, report = pruned("llama", "channels", sparsity=0.5, method="flap", round_to=1)
    assert report.bias_compensation and llama.config.mlp_bias
    assert all(layer.mlp.gate_proj.bias is not None for layer in llama.model.layers)  # mlp_bias governs all three
    _, _, report = pruned("mistral", "channels", sparsity=0.5, method="flap", round_to=1)
    assert not report.bias_compensation and "no config flag" in report.bias_compensation_note


def test_round_to_and_target_params():
    model = tiny_model("llama", intermediate=256)  # 20% of 256 leaves 205 channels: the nearest multiple is 192
    report = prune_structured(model, None, StructuredConfig("channels", method="magnitude", sparsity=0.2, round_to=64),
                              progress=False).structure
    assert report.units_kept == model.config.intermediate_size == 192 and report.round_to == 64
    model = tiny_model("llama", intermediate=256)
    config = StructuredConfig("channels", method="magnitude", round_to=1)
    config = replace(config, sparsity=sparsity_for_params(model, config, 0.3))
    report = prune_structured(model, calibration(), config, progress=False).structure
    per_channel = 3 * 64 * 3 / report.decoder_params_before  # gate row + up row + down column, 3 layers
    assert abs(report.decoder_params_removed_fraction - 0.3) <= per_channel / 2 + 1e-9


def test_pruned_model_prunes_again_unstructured():
    from llmprune.config import PruneConfig
    from llmprune.pruning.runner import prune

    _, model, _ = pruned("llama", "heads", sparsity=0.5, method="wanda")
    result = prune(model, calibration(), PruneConfig(method="sparsegpt", sparsity=0.5, seqlen=16), progress=False)
    assert result.achieved_sparsity == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("family,options,message", [
    ("gpt2", {"structure": "heads"}, "fuses q, k and v"),
    ("gpt_neox", {"structure": "heads"}, "fuses q, k and v"),
    ("opt", {"structure": "heads"}, "head size from hidden_size"),
    ("llama", {"structure": "heads", "sparsity": 0.8}, "every query head of each KV group"),
    ("llama", {"structure": "heads", "sparsity": 0.1}, "removes no query head"),
    ("llama", {"structure": "heads", "sparsity": 0.9, "heads_mode": "groups"}, "removes all 2 KV groups"),
    ("llama", {"structure": "layers", "sparsity": 0.9}, "removes all 3 layers"),
    ("llama", {"structure": "layers", "sparsity": 0.1}, "removes none"),
    ("llama", {"structure": "channels", "round_to": 256}, "removes no MLP channel"),
    ("mistral", {"structure": "channels", "round_to": 1, "bias_compensation": True}, "drop --bias-compensation"),
])
def test_bad_input_fails_before_any_work(family, options, message):
    model = tiny_model(family)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(LLMPruneError, match=message):
        prune_structured(model, calibration(), StructuredConfig(**options), progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and state.keys() == model.state_dict().keys()


def test_head_count_the_family_rejects_names_the_counts_it_accepts():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # Llama's config wants hidden_size (64) to be a multiple of the head count
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=8, vocab_size=VOCAB)).eval()
    with pytest.raises(LLMPruneError, match=r"num_attention_heads=6.*can express here: 0.5, 0.75, 0.875"):
        prune_structured(model, None, StructuredConfig("heads", method="magnitude", sparsity=0.25), progress=False)
    report = prune_structured(model, None, StructuredConfig("heads", method="magnitude", sparsity=0.5),
                              progress=False).structure
    assert report.heads_mode == "groups" and model.config.num_attention_heads == 4  # MHA: a head is a group


def test_bad_config_and_missing_calibration():
    with pytest.raises(LLMPruneError, match="drop --method"):
        StructuredConfig("layers", method="wanda")
    with pytest.raises(LLMPruneError, match="no structured importance"):
        StructuredConfig("channels", method="sparsegpt")
    with pytest.raises(LLMPruneError, match="--sparsity"):
        StructuredConfig("channels", sparsity=1.0)
    with pytest.raises(LLMPruneError, match="needs calibration"):
        prune_structured(tiny_model("llama"), None, StructuredConfig("channels", round_to=1), progress=False)
    report = prune_structured(tiny_model("llama"), None, StructuredConfig("channels", method="magnitude", round_to=1),
                              progress=False).structure  # weights alone: no data needed
    assert report.units_kept == 102


def test_bench_quick_writes_json_and_plot(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_structured.py"
    spec = importlib.util.spec_from_file_location("bench_structured", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--out", str(tmp_path), "--repeats", "1",
                "--rows", "channels-flap-20%|heads-wanda-10%|layers-influence-30%|unstructured-wanda"])
    results = json.loads((tmp_path / "structured.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    assert results["complete"] and (tmp_path / "structured.png").stat().st_size > 0
    assert "removes no query head" in rows["heads-wanda-10%"]["error"]  # 10% of a group of 3: recorded, not fatal
    assert rows["channels-flap-20%"]["safetensors_bytes"] < results["dense"]["safetensors_bytes"]
    assert rows["layers-influence-30%"]["decoder_params_removed_fraction"] == pytest.approx(2 / 6)
    assert rows["unstructured-wanda-50%"]["params"] == results["dense"]["params"]
    assert rows["channels-flap-20%"]["prefill_s"]["speedup"] > 0 and rows["channels-flap-20%"]["decode_tok_s"]["pruned"] > 0


def test_bench_structured_decoder_fraction_rows(tmp_path):
    """--decoder-fraction 0.2: each row removes the channel count nearest to a fifth of the decoder's parameters
    (counted here from the saved folder), a structure that cannot is recorded, and --save-dir keeps the model."""
    import importlib.util
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_structured.py"
    spec = importlib.util.spec_from_file_location("bench_structured", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--out", str(tmp_path), "--repeats", "1", "--decoder-fraction", "0.2",
                "--rows", "^(channels-flap|heads-flap)-", "--save-dir", str(tmp_path / "models")])
    results = json.loads((tmp_path / "structured.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    assert rows.keys() == {"channels-flap-20%decoder", "heads-flap-20%decoder"}
    assert "no --structure heads shape" in rows["heads-flap-20%decoder"]["error"]
    weights = load_file(tmp_path / "models" / "channels-flap-20%decoder" / "model.safetensors")
    decoder = sum(w.numel() for name, w in weights.items() if ".layers." in name)
    dense = results["dense"]["decoder_params"]  # the tiny Llama: 6 layers, hidden 96, MLP 256, round_to 16
    assert rows["channels-flap-20%decoder"]["decoder_params"] == decoder
    step = 16 * 3 * 96 * 6  # one step of 16 channels in every layer's three MLP projections
    assert abs((dense - decoder) - 0.2 * dense) <= step  # the candidate next to a fifth of the decoder
    assert rows["channels-flap-20%decoder"]["params"] <= 1.02 * int(results["target_params"])  # at most 2% over
    assert int(results["target_params"]) == results["dense"]["params"] - round(0.2 * dense)  # embeddings all kept
    assert rows["channels-flap-20%decoder"]["sparsity"] == pytest.approx(1 - weights[
        "model.layers.0.mlp.up_proj.weight"].shape[0] / 256)


def test_chained_records_count_against_the_dense_model():
    """Two layer prunes in a row, by hand: 10 layers, [2, 5] removed, then [2, 6] of the 8 left, which are dense
    layers 3 and 8; a stage to 40% of the dense count removes 0.25 of those 8."""
    from llmprune.pruning.structured.runner import chain_records, stage_sparsity
    from llmprune.report import StructureRecord

    def record(removed, before, kept, params_before, params_after):  # the untyped form of report.json before it
        return StructureRecord.from_dict({"kind": "layers", "method": "influence", "sparsity": len(removed) / before, "unit": "layers",
                "units_before": before, "units_kept": kept, "removed_layers": removed, "layer_scores": [0.0] * before,
                "achieved_sparsity": len(removed) / before, "params_before": params_before,
                "params_after": params_after, "params_removed_fraction": 1 - params_after / params_before,
                "decoder_params_before": params_before - 10, "decoder_params_after": params_after - 10,
                "decoder_params_removed_fraction": 0.0, "config_changes": {"num_hidden_layers": kept},
                "seconds": {"score": 1.0}})

    first = record([2, 5], 10, 8, 110, 90)
    assert stage_sparsity(first, 0.4) == pytest.approx(0.25)
    second = record([2, 6], 8, 6, 90, 70)
    joined = chain_records(first, second, 0.4)
    assert joined.removed_layers == [2, 3, 5, 8]
    assert (joined.units_before, joined.units_kept, joined.sparsity) == (10, 6, 0.4)
    assert joined.achieved_sparsity == pytest.approx(0.4)
    assert joined.params_removed_fraction == pytest.approx(40 / 110)
    assert joined.decoder_params_removed_fraction == pytest.approx(40 / 100)
    assert joined.config_changes == {"num_hidden_layers": 6} and joined.seconds == {"score": 2.0}
    assert joined.stages == [first, second] and joined.layer_scores is None
    third = record([0], 6, 5, 70, 60)
    assert chain_records(joined, third, 0.5).removed_layers == [0, 2, 3, 5, 8]
    assert len(chain_records(joined, third, 0.5).stages) == 3
