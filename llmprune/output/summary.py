"""The table printed at the end of a run, from the report alone."""

from __future__ import annotations

from ..report import Report


def format_summary(report: Report) -> str:
    """One header line, per-layer rows only where a layer's target differs from the run's (OWL, skips), then
    the achieved sparsity, perplexities, time and memory."""
    lines = [f"{report.model_name} ({report.architecture}): {report.method}"
             + (f" + {report.update} update" if report.update != "none" else "")
             + f", {report.pattern}, target sparsity {report.sparsity:.4g}, allocation {report.allocation}"]
    if report.structure:
        return "\n".join(structure_lines(report) + [""] + _evaluation_lines(report))
    layers = report.decoder_layers()
    differing = [row for row in layers if abs(row[1] - report.sparsity) > 1e-9 or abs(row[2] - row[1]) > 0.005]
    if differing:
        lines += ["", "layer  target  achieved"]
        lines += [f"{i:>5}  {target:6.4f}  {achieved:8.4f}" for i, target, achieved in differing]
        if len(differing) < len(layers):
            lines.append(f"(the other {len(layers) - len(differing)} layers: {report.sparsity:.4f} as targeted)")
    recovered = (report.recovery or {}).get("achieved_sparsity")
    experts = len((report.moe or {}).get("experts", []))
    lines += ["", f"achieved sparsity over {len(report.layers)} pruned linears"
              + (f" and {experts} expert matrices" if experts else "") + f" in {len(layers)} layers: "
              f"{report.achieved_sparsity:.6f}"
              + (f" (after recovery: {recovered:.6f})" if recovered is not None else "")]
    return "\n".join(lines + coverage_lines(report) + _evaluation_lines(report))


def coverage_lines(report: Report) -> list[str]:
    """What was pruned and what was left dense, per kind of weight; the experts' calibration; and, loudly, any
    weight of a decoder layer that stayed dense without anything asking for it."""
    if not report.coverage:
        return []
    lines = []
    for kind, entry in report.coverage["kinds"].items():
        dense = ", ".join(f"{n:,} {why}" for why, n in entry["dense_by"].items())
        pruned = f"{entry['pruned']:,} pruned to {entry['zeros'] / entry['pruned']:.4f}" if entry["pruned"] else ""
        lines.append(f"  {kind}: " + "; ".join(part for part in (pruned, dense and f"dense: {dense}") if part))
    lines = ["weights by kind (parameters):"] + lines
    moe = report.moe
    if moe and moe.get("blocks"):
        rare = {name: block["rare"] for name, block in moe["blocks"].items() if block["rare"]}
        fewest = min(min(block["tokens"]) for block in moe["blocks"].values())
        lines.append(f"experts: {len(moe['blocks'])} MoE layers, fewest calibration tokens routed to an expert: {fewest}")
        for name, experts in rare.items():
            lines.append(f"  rare experts (< {moe['min_expert_tokens']} tokens, statistics: {moe['rare_experts']}) "
                         f"of {name}: {experts}")
    unaccounted = report.coverage["unaccounted"]
    if unaccounted:
        lines.append(f"WARNING: {len(unaccounted)} weights of decoder layers were left dense without being asked "
                     f"(not a linear, not a known expert layout): {', '.join(unaccounted[:5])}"
                     + (" ..." if len(unaccounted) > 5 else ""))
    return lines


def structure_lines(report: Report) -> list[str]:
    """What a structured prune removed, and what it saved."""
    s = report.structure
    what = {"channels": "MLP channels", "heads": "attention heads", "layers": "decoder layers",
            "hidden": "hidden (embedding) channels"}.get(s.kind, s.kind)
    lines = [f"{report.model_name} ({report.architecture}): --structure {s.kind}, scored by {s.method}"]
    if s.shape:
        lines.append("shape: " + ", ".join(f"{axis} {value:.4g}" for axis, value in s.shape.items())
                     + (f" (from {s.shape_source})" if s.shape_source else ""))
    if s.stages and s.unit == "parameters":  # several structures: each axis's own record
        lines += [f"  {stage.kind}: {stage.units_before} -> {stage.units_kept} {stage.unit}"
                  + (" per layer" if stage.kind in ("channels", "heads") else "") for stage in s.stages]
    elif s.kind == "layers":
        lines.append(f"removed {len(s.removed_layers)} of {s.units_before} {what}: {s.removed_layers}")
    else:
        lines.append(f"removed {s.units_before - s.units_kept} of {s.units_before} {what}"
                     f"{'' if s.kind == 'hidden' else ' per layer'} "
                     f"({s.achieved_sparsity:.1%}; asked {s.sparsity:.1%}"
                     + (f", widths rounded to multiples of {s.round_to}" if (s.round_to or 1) > 1 else "") + ")")
        if s.bias_compensation:
            lines.append("their mean output is folded into the next linear's bias (bias compensation)")
    lines.append(f"parameters {s.params_before / 1e6:.2f}M -> {s.params_after / 1e6:.2f}M "
                 f"({s.params_removed_fraction:.1%} fewer; decoder layers {s.decoder_params_removed_fraction:.1%})"
                 + (f"; target {s.target_params / 1e6:.2f}M" if s.target_params else ""))
    lines.append("config: " + ", ".join(f"{k}={v}" for k, v in s.config_changes.items()))
    return lines


def _evaluation_lines(report: Report) -> list[str]:
    lines = []
    recovered = report.recovery or {}
    if recovered.get("val_ppl_last") is not None:
        lines.append(f"recovery ({recovered.get('params')} + {recovered.get('loss')}, {recovered.get('tokens')} tokens): "
                     f"validation perplexity {recovered.get('val_ppl_first', float('nan')):.3f} -> "
                     f"{recovered['val_ppl_last']:.3f}")
    ppl = report.perplexity
    if ppl:
        lines.append(f"perplexity ({ppl.dataset}, {ppl.windows} x {ppl.seqlen}): dense {ppl.dense:.3f} -> "
                     f"pruned {ppl.pruned:.3f}" + (f" -> recovered {ppl.recovered:.3f}" if ppl.recovered else ""))
    for name, scores in (("dense", report.zero_shot_dense), ("pruned", report.zero_shot)):
        if scores and scores.get("mean_acc") is not None:
            lines.append(f"zero-shot mean accuracy ({name}): {scores['mean_acc']:.4f}")
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
    if report.peak_rss_bytes:
        lines.append(f"peak memory (RSS): {report.peak_rss_bytes / 2**30:.2f} GiB")
    return lines
