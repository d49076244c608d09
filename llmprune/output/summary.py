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
    lines += ["", f"achieved sparsity over {len(report.layers)} pruned linears in {len(layers)} layers: "
              f"{report.achieved_sparsity:.6f}"
              + (f" (after recovery: {recovered:.6f})" if recovered is not None else "")]
    return "\n".join(lines + _evaluation_lines(report))


def structure_lines(report: Report) -> list[str]:
    """What a structured prune removed, and what it saved."""
    s = report.structure
    what = {"channels": "MLP channels", "heads": "attention heads", "layers": "decoder layers",
            "hidden": "hidden (embedding) channels"}.get(s.kind, s.kind)
    lines = [f"{report.model_name} ({report.architecture}): --structure {s.kind}, scored by {s.method}"]
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
