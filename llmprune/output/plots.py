"""`llmprune report`: compare finished runs side by side in a report.md with PNG plots.

Only each run's report.json (and the eval.json of `llmprune eval`, if any) is read, so runs made on
other machines can be compared after their weights were deleted.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter

from ..errors import LLMPruneError
from ..report import Report
from .atomic import write_atomically, write_text_atomically

REPORT_NAME = "report.md"
LAYER_PLOT = "layer_sparsity.png"
PPL_PLOT = "ppl_vs_sparsity.png"
ACCURACY_PLOT = "accuracy_vs_sparsity.png"
NM_MARKERS = ("s", "D", "^", "v", "P", "X")  # one per N:M pattern, in order of first appearance
RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
DPI = 120


@dataclass
class Run:
    """One run as the report needs it: report.json with the gaps filled from eval.json."""

    name: str
    report: Report
    perplexity: dict | None  # {"dataset", "seqlen", "windows", "dense", "pruned", "recovered"?}
    zero_shot: dict | None  # the pruned model's {"tasks": {...}, "mean_acc": ...}
    zero_shot_dense: dict | None

    @property
    def group(self) -> tuple[str, str, str]:
        """Runs of one (method, pattern kind, allocation) share a colour and, if unstructured, a line."""
        kind = "unstructured" if self.report.pattern == "unstructured" else "N:M"
        return self.report.method, kind, self.report.allocation

    @property
    def mean_acc(self) -> float | None:
        return (self.zero_shot or {}).get("mean_acc")

    @property
    def dense_mean_acc(self) -> float | None:
        return (self.zero_shot_dense or {}).get("mean_acc")


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Compare the llmprune output directories `run_dirs` in `out_dir`/report.md plus PNG plots.

    Returns the path of report.md. Every file is drawn in memory first and then written atomically, report.md
    last, so a failure while drawing leaves `out_dir` as it was; other files in `out_dir` are kept, but a plot
    of a previous report that this one has no data for is removed, so that the folder never shows a stale plot.
    """
    if not run_dirs:
        raise LLMPruneError("no run given: pass one or more output directories of `python -m llmprune --output DIR`")
    paths = [Path(d) for d in run_dirs]
    runs = [_load_run(path, name) for path, name in zip(paths, _run_names(paths))]

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LLMPruneError(f"{out_dir} is a file; give --out a directory")
    plots = {LAYER_PLOT: _plot_layer_sparsity(runs),
             PPL_PLOT: _plot_metric_vs_sparsity(runs, "perplexity"),
             ACCURACY_PLOT: _plot_metric_vs_sparsity(runs, "accuracy")}
    written = [name for name, png in plots.items() if png is not None]
    markdown = _markdown(runs, written)
    for name, png in plots.items():
        if png is None:
            (out_dir / name).unlink(missing_ok=True)
        else:
            write_atomically(out_dir / name, lambda partial, png=png: partial.write_bytes(png))
    # report.md last: while the plots are written, it never references one that is not there yet.
    return write_text_atomically(out_dir / REPORT_NAME, markdown)


# ---------------------------------------------------------------------------------------------- loading


def _run_names(paths: list[Path]) -> list[str]:
    # The directory name is the natural label; runs in same-named folders (a/model, b/model) keep their path.
    names = [path.resolve().name for path in paths]
    return [name if names.count(name) == 1 else path.as_posix() for name, path in zip(names, paths)]


def _load_run(path: Path, name: str) -> Run:
    if not path.is_dir():
        raise LLMPruneError(f"run directory {path} does not exist")
    if not (path / "report.json").is_file():
        raise LLMPruneError(f"{path} has no report.json; pass output directories of `python -m llmprune --output DIR`")
    report = Report.load(path / "report.json")
    evaluation = _read_json(path / "eval.json") if (path / "eval.json").is_file() else {}
    eval_zero_shot = evaluation.get("zero_shot") or {}
    return Run(name=name, report=report,
               perplexity=asdict(report.perplexity) if report.perplexity else _eval_perplexity(evaluation),
               zero_shot=report.zero_shot or eval_zero_shot.get("model"),
               zero_shot_dense=report.zero_shot_dense or eval_zero_shot.get("baseline"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LLMPruneError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise LLMPruneError(f"{path} does not hold a JSON object")
    return data


def _eval_perplexity(evaluation: dict) -> dict | None:
    """A run pruned with --eval none but measured later by `llmprune eval`: its first dataset, in report shape."""
    for dataset, scores in (evaluation.get("perplexity") or {}).items():
        return {"dataset": dataset, "seqlen": scores.get("seqlen"), "windows": scores.get("windows"),
                "dense": scores.get("baseline"), "pruned": scores.get("model")}
    return None


def _decoder_layer_sparsity(report: Report) -> dict[int, float]:
    """Achieved sparsity of each decoder layer; linears outside the decoder layers have no point on this axis."""
    return {index: achieved for index, _, achieved in report.decoder_layers()}


# ---------------------------------------------------------------------------------------------- plots


def _new_figure(width: float = 9.0, height: float = 5.0):
    # A bare Figure on an Agg canvas, not pyplot: no global figure registry to leak into or close, and the
    # caller's interactive backend (e.g. in a notebook) is left alone.
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _png(figure, axes) -> bytes:
    axes.grid(True, alpha=0.3)
    # Legends sit right of the axes so they never hide a point; bbox "tight" widens the image to fit them.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=DPI, bbox_inches="tight")
    return image.getvalue()


def _colors(count: int) -> list:
    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]


def _plot_layer_sparsity(runs: list[Run]) -> bytes | None:
    figure, axes = _new_figure()
    values = []
    for i, (run, color) in enumerate(zip(runs, _colors(len(runs)))):
        achieved = _decoder_layer_sparsity(run.report)
        # Runs of one target often coincide layer for layer; hollow markers of a different shape per run keep
        # each visible through the ones drawn over it.
        axes.plot(list(achieved), list(achieved.values()), color=color, linewidth=1.2, label=run.name,
                  marker=RUN_MARKERS[i % len(RUN_MARKERS)], markersize=5, markerfacecolor="none")
        target = run.report.layer_sparsity
        axes.plot(range(len(target)), target, color=color, linestyle="--", linewidth=1, alpha=0.8)
        values += [*achieved.values(), *target]
    if not values:
        return None
    # One legend entry explains every dashed line, instead of doubling the entries per run.
    axes.plot([], [], color="0.4", linestyle="--", linewidth=1, label="target (dashed)")
    # Uniform runs sit within a hair of their target: a floor on the padding keeps that flat instead of
    # stretching rounding noise over the whole height.
    low, high = min(values), max(values)
    pad = max(0.05, 0.1 * (high - low))
    axes.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("achieved sparsity (size-weighted over its linears)")
    axes.set_title("Sparsity per decoder layer (dashed: target)")
    return _png(figure, axes)


def _metric(run: Run, metric: str, stage: str) -> float | None:
    """The run's perplexity or mean zero-shot accuracy at `stage` (dense, pruned, recovered), if finite."""
    if metric == "perplexity":
        value = (run.perplexity or {}).get(stage)
    else:
        value = {"dense": run.dense_mean_acc, "pruned": run.mean_acc}.get(stage)
    return value if value is not None and math.isfinite(value) else None  # inf cannot sit on a log axis


def _plot_metric_vs_sparsity(runs: list[Run], metric: str) -> bytes | None:
    """Perplexity or mean zero-shot accuracy against achieved sparsity, one colour per run group (a PNG; None
    when no run has the metric)."""
    if all(_metric(run, metric, "pruned") is None for run in runs):
        return None
    figure, axes = _new_figure()
    # Colours and markers are assigned over all runs, not only those with this metric, so that a group
    # looks the same in the perplexity and the accuracy plot.
    groups = list(dict.fromkeys(run.group for run in runs))
    nm_patterns = list(dict.fromkeys(run.report.pattern for run in runs if run.group[1] == "N:M"))
    values = []
    for group, color in zip(groups, _colors(len(groups))):
        method, kind, allocation = group
        members = sorted((run for run in runs if run.group == group), key=lambda run: _achieved(run.report))
        # Unstructured runs trace a curve over sparsity; each N:M pattern fixes its sparsity, so its runs are
        # points, told apart by marker.
        series = [("unstructured", "o", members)] if kind == "unstructured" else [
            (pattern, NM_MARKERS[i % len(NM_MARKERS)], [run for run in members if run.report.pattern == pattern])
            for i, pattern in enumerate(nm_patterns)]
        for stage in ("pruned", "recovered"):
            recovered = stage == "recovered"
            for pattern, marker, subset in series:
                pairs = [(_achieved(run.report), _metric(run, metric, stage)) for run in subset]
                pairs = [(x, y) for x, y in pairs if y is not None]
                if not pairs:
                    continue
                linestyle = "none" if kind == "N:M" else ":" if recovered else "-"
                # After recovery: same colour, hollow markers, dotted line.
                axes.plot(*zip(*pairs), color=color, marker=marker, markersize=7, linestyle=linestyle,
                          markerfacecolor="none" if recovered else color,
                          label=f"{method}, {pattern}, {allocation}" + (" + recovery" if recovered else ""))
                values += [y for _, y in pairs]
    values += _dense_lines(axes, [(run, _metric(run, metric, "dense")) for run in runs], metric)

    axes.xaxis.set_major_formatter(PercentFormatter(1.0))
    low, high = axes.get_xlim()
    if high - low < 0.1:  # runs at (nearly) one sparsity: show 10 points, not the 1e-6 rounding between them
        middle = (low + high) / 2
        axes.set_xlim(middle - 0.05, middle + 0.05)
    axes.set_xlabel("achieved sparsity")
    if metric == "perplexity":
        _log_axis(axes, values)
        datasets = sorted({str(run.perplexity["dataset"]) for run in runs if run.perplexity})
        axes.set_ylabel(f"perplexity on {', '.join(datasets)} (log scale, lower is better)")
        axes.set_title("Perplexity vs sparsity")
    else:
        axes.set_ylabel("mean zero-shot accuracy (higher is better)")
        axes.set_title("Mean zero-shot accuracy vs sparsity")
    return _png(figure, axes)


def _dense_lines(axes, dense: list[tuple[Run, float | None]], metric: str) -> list[float]:
    """One horizontal reference per distinct dense value (runs of one base model share it); returns the values."""
    models: dict[float, list[str]] = {}
    for run, value in dense:
        if value is not None:
            names = models.setdefault(round(value, 6), [])
            model = str(run.report.model_name)
            if model not in names:
                names.append(model)
    linestyles = itertools.cycle(["--", "-.", (0, (5, 1, 1, 1, 1, 1))])
    for value, names in models.items():
        shown = f"{value:.2f}" if metric == "perplexity" else f"{value:.3f}"
        # Name the model only when several dense references would otherwise be indistinguishable.
        label = f"dense ({shown})" if len(models) == 1 else f"dense {', '.join(names)} ({shown})"
        axes.axhline(value, color="0.25", linestyle=next(linestyles), linewidth=1.2, label=label)
    return list(models)


def _log_axis(axes, values: list[float]) -> None:
    # Matplotlib's default log ticks label only powers of ten, which leaves a 20-to-40 range unlabelled;
    # denser 1-2-5 (or finer) ticks suit the few decades that perplexities usually span.
    axes.set_yscale("log")
    decades = math.log10(max(values) / min(values)) if values else 0.0
    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades <= 1 else (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())


# ---------------------------------------------------------------------------------------------- markdown


def _markdown(runs: list[Run], plots: list[str]) -> str:
    lines = ["# llmprune report", "", f"{len(runs)} run{'s' if len(runs) > 1 else ''} of "
             + ", ".join(dict.fromkeys(f"`{run.report.model_name}`" for run in runs))
             + ".", "", _runs_table(runs), *_perplexity_notes(runs)]
    zero_shot = _zero_shot_table(runs)
    if zero_shot:
        lines += ["", "## Zero-shot accuracy", "", zero_shot]
    captions = {LAYER_PLOT: "Achieved sparsity per decoder layer (dashed: target)",
                PPL_PLOT: "Perplexity vs achieved sparsity",
                ACCURACY_PLOT: "Mean zero-shot accuracy vs achieved sparsity"}
    if plots:
        lines += ["", "## Plots"]
        lines += [line for name in plots for line in ("", f"![{captions[name]}]({name})")]
    return "\n".join(lines) + "\n"


def _runs_table(runs: list[Run]) -> str:
    header = ["run", "method", "pattern", "allocation", "target", "achieved",
              "perplexity dense → pruned (→ recovered)", "zero-shot mean acc dense → pruned", "prune (s)"]
    rows = [_row(header), _row(["---"] * len(header))]
    for run in runs:
        report, ppl = run.report, run.perplexity or {}
        perplexity = _chain([ppl.get("dense"), ppl.get("pruned"), ppl.get("recovered")], "{:.2f}")
        accuracy = _chain([run.dense_mean_acc, run.mean_acc], "{:.3f}")
        prune_seconds = report.seconds.get("prune")
        pattern = f"{report.structure.kind} (structured)" if report.structure else report.pattern
        rows.append(_row([run.name, report.method, pattern, report.allocation,
                          f"{report.sparsity:.1%}", f"{_achieved(report):.2%}", perplexity, accuracy,
                          "n/a" if prune_seconds is None else f"{prune_seconds:.1f}"]))
    return "\n".join(rows)


def _achieved(report: Report) -> float:
    """The sparsity a run achieved: of its linears' weights, or of the structure a structured run removed."""
    return report.structure.achieved_sparsity if report.structure else report.achieved_sparsity


def _chain(values: list[float | None], spec: str) -> str:
    present = [spec.format(value) for value in values if value is not None]
    return " → ".join(present) if present else "n/a"


def _perplexity_notes(runs: list[Run]) -> list[str]:
    """Where each perplexity was measured: numbers from different texts or window sizes do not compare."""
    settings: dict[str, list[str]] = {}
    for run in runs:
        if run.perplexity:
            ppl = run.perplexity
            setting = f"{ppl.get('dataset')}, {ppl.get('windows')} windows of {ppl.get('seqlen')} tokens"
            settings.setdefault(setting, []).append(run.name)
    if len(settings) == 1:
        return ["", f"Perplexity measured on {next(iter(settings))}."]
    notes = [f"- {setting}: {', '.join(names)}" for setting, names in settings.items()]
    return ["", "Perplexity was measured in different settings, so not all rows compare:", "", *notes] if notes else []


def _zero_shot_table(runs: list[Run]) -> str:
    """Per-task `acc`, one row per run plus one per distinct dense result, tasks as columns."""
    scored = [run for run in runs if run.zero_shot and run.zero_shot.get("tasks")]
    if not scored:
        return ""
    tasks = list(dict.fromkeys(task for run in scored for task in run.zero_shot["tasks"]))
    results = {}  # label -> zero_shot dict; dense results are deduplicated: runs of one model share them
    for run in scored:
        if run.zero_shot_dense and run.zero_shot_dense.get("tasks") and run.zero_shot_dense not in results.values():
            model = run.report.model_name
            results[f"dense ({model})"] = run.zero_shot_dense
    results.update({run.name: run.zero_shot for run in scored})
    rows = [_row(["model", *tasks, "mean"]), _row(["---"] * (len(tasks) + 2))]
    for label, result in results.items():
        cells = [(result["tasks"].get(task) or {}).get("acc") for task in tasks]
        rows.append(_row([label, *("n/a" if acc is None else f"{acc:.3f}" for acc in cells),
                          "n/a" if result.get("mean_acc") is None else f"{result['mean_acc']:.3f}"]))
    notes = ["", "Accuracy is lm-evaluation-harness `acc`; the mean is over the tasks each row scored."]
    limits = sorted({result.get("limit") for result in results.values() if result.get("limit")})
    if limits:
        notes.append(f"Some rows scored only the first {' or '.join(map(str, limits))} documents of each task.")
    return "\n".join(rows + notes)


def _row(cells: list) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def plot_candidates(candidates: list, target: float, dense_params: int) -> bytes:
    """The search's candidates.png: each scored shape's parameters against its KL to the dense model; a
    distilled one's KL after distillation too (joined to its one-shot point); the target as a dotted line; the
    chosen shape (the list's first, best first) marked and labelled. PNG bytes."""
    figure, axes = _new_figure(8.0, 5.0)
    scored = [c for c in candidates if c.kl is not None and math.isfinite(c.kl)]
    distilled = [c for c in scored if getattr(c, "kl_distilled", None) is not None and math.isfinite(c.kl_distilled)]
    axes.scatter([c.params / 1e6 for c in scored], [c.kl for c in scored], color="tab:blue", zorder=3,
                 label="one-shot KL")
    for c in distilled:
        axes.plot([c.params / 1e6] * 2, [c.kl, c.kl_distilled], color="tab:gray", linewidth=0.8, zorder=2)
    if distilled:
        axes.scatter([c.params / 1e6 for c in distilled], [c.kl_distilled for c in distilled], color="tab:orange",
                     marker="D", zorder=3, label="KL after distillation")
    values = [c.kl for c in scored] + [c.kl_distilled for c in distilled]
    if scored:
        best = candidates[0]
        y = best.kl_distilled if getattr(best, "kl_distilled", None) is not None else best.kl
        if y is not None and math.isfinite(y):
            axes.scatter([best.params / 1e6], [y], s=260, marker="*", color="tab:red", zorder=4, label="chosen")
            shape = ", ".join(f"{axis} {value:.3g}" for axis, value in best.shape.items())
            axes.annotate(f"{shape}\n{best.params / 1e6:.2f}M", (best.params / 1e6, y), xytext=(8, 8),
                          textcoords="offset points", fontsize=8)
    axes.axvline(target / 1e6, color="black", linestyle=":", linewidth=1, label=f"target {target / 1e6:.1f}M")
    if values and min(values) > 0 and max(values) / min(values) > 5:
        axes.set_yscale("log")
    axes.set_xlabel("parameters (M)")
    axes.set_ylabel("KL(dense || pruned), nats/token")
    axes.set_title(f"Candidate shapes for {target / 1e6:.1f}M parameters (dense {dense_params / 1e6:.1f}M)")
    return _png(figure, axes)
