"""The table printed at the end of a run, from the report alone."""

from __future__ import annotations

import re
from collections import defaultdict


def decoder_layer_sparsity(report: dict) -> list[tuple[int, float, float]]:
    """(layer index, target, achieved) per decoder layer, weighting its linears by size."""
    zeros, sizes, targets = defaultdict(float), defaultdict(int), {}
    for linear in report["layers"]:
        index = int(re.search(r"\.(\d+)\.", linear["name"]).group(1))
        numel = linear["shape"][0] * linear["shape"][1]
        zeros[index] += linear["achieved_sparsity"] * numel
        sizes[index] += numel
        targets[index] = linear["sparsity"]
    return [(i, targets[i], zeros[i] / sizes[i]) for i in sorted(sizes)]


def format_summary(report: dict) -> str:
    lines = [f"{report['model']} ({report['architecture']}): {report['method']}, {report['pattern']}, "
             f"target sparsity {report['sparsity']:.4g}, allocation {report['allocation']}", "",
             "layer  target  achieved"]
    lines += [f"{i:>5}  {target:6.4f}  {achieved:8.4f}" for i, target, achieved in decoder_layer_sparsity(report)]
    lines += ["", f"achieved sparsity over {len(report['layers'])} pruned linears: {report['achieved_sparsity']:.6f}"
              + (f" (after LoRA recovery: {report['recovery']['achieved_sparsity']:.6f})"
                 if "achieved_sparsity" in (report.get("recovery") or {}) else "")]
    ppl = report.get("perplexity")
    if ppl:
        lines.append(f"perplexity ({ppl['dataset']}, {ppl['windows']} x {ppl['seqlen']}): "
                     f"dense {ppl['dense']:.3f} -> pruned {ppl['pruned']:.3f}"
                     + (f" -> recovered {ppl['recovered']:.3f}" if ppl.get("recovered") else ""))
    seconds = report["seconds"]
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    lines.append(f"peak memory (RSS): {report['peak_rss_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)
