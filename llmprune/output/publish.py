"""Publishing: the Hub model card written into every output, and pushing an output directory to the Hub."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from urllib.parse import quote

import yaml

from ..errors import LLMPruneError
from ..report import Report

CARD_NAME = "README.md"
# Load snippet target of a card written before anyone knows where the model will be published.
LOCAL_PLACEHOLDER = "path/to/this/folder"
REQUIRED_FILES = ("config.json", "report.json")
# What an output is made of: weights, configs and tokenizer files, reports, the card, an exported GGUF.
OUTPUT_SUFFIXES = (".json", ".safetensors", ".md", ".txt", ".jinja", ".model", ".gguf")
METHOD_NAMES = {"magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}


# ---------------------------------------------------------------- model card


def model_card(report: Report | dict, repo_id: str | None = None) -> str:
    """The Hub model card (README.md) for a run described by `report` (a Report, or its dict as in report.json);
    pure, so an untouched card can be recognised."""
    report = report if isinstance(report, Report) else Report.from_dict(report)
    sections = [
        _front_matter(report),
        _intro(report),
        _provenance(report),
        _layer_summary([asdict(linear) for linear in report.layers]),
        _evaluation(report),
        _recovery(report.recovery),
        _usage(repo_id or LOCAL_PLACEHOLDER),
        "" if report.structure else _storage_note(report.pattern),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def write_model_card(output_dir: str | Path, report: Report | dict, repo_id: str | None = None) -> Path:
    path = Path(output_dir) / CARD_NAME
    path.write_text(model_card(report, repo_id), encoding="utf-8")
    return path


def _front_matter(report: Report) -> str:
    metadata = {}
    if report.base_model:
        metadata["base_model"] = report.base_model
    metadata["library_name"] = "transformers"
    if report.license:
        metadata["license"] = report.license
    metadata["pipeline_tag"] = "text-generation"
    tags = (["pruned", "structured-pruning", report.structure.kind, report.method, "llmprune"]
            if report.structure else ["pruned", "sparse", report.method, report.pattern, "llmprune"])
    metadata["tags"] = [str(tag) for tag in dict.fromkeys(tags) if tag]
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---"


def _structured_intro(report: Report, base: str) -> str:
    s = report.structure
    what = {"channels": "MLP channels", "heads": "attention heads", "layers": "decoder layers",
            "hidden": "hidden (embedding) channels", "experts": "routed experts"}.get(s.kind)
    removed = ("; ".join(f"{st.kind} {st.units_before} → {st.units_kept}" for st in s.stages)
               if s.unit == "parameters" else
               f"decoder layers {', '.join(map(str, s.removed_layers))} removed" if s.kind == "layers" else
               f"{s.units_before - s.units_kept} of its {s.units_before} {what} removed everywhere"
               if s.kind == "hidden" else
               f"{s.units_before - s.units_kept} of every {s.units_before} {what} removed in each layer")
    if s.kind == "experts":  # which ones, by their index in the dense model
        removed += " (" + "; ".join(f"layer {layer.index}: {layer.removed}" for layer in s.layers) + ")"
    if s.shape:  # the shape over several structures, and where it came from
        removed += (" (shape " + ", ".join(f"{axis} {value:.4g}" for axis, value in s.shape.items())
                    + (" from a search" if s.shape_source == "search" else
                       f" from `{Path(s.shape_source).name}`" if s.shape_source else "") + ")")
    base_link = f"[{base}](https://huggingface.co/{base})" if "/" in base else f"`{base}`"
    return (f"# {base.rsplit('/', 1)[-1]}, {_pct(s.params_removed_fraction, 0)} smaller ({s.kind}, "
            f"{s.method})\n\n{base_link} made smaller by structured pruning with "
            f"[llmprune](https://pypi.org/project/llmprune/): {removed}, scored by **{s.method}**"
            f"{' with bias compensation' if s.bias_compensation else ''}. Parameters "
            f"{_count(s.params_before)} → {_count(s.params_after)}; the config states the new shapes "
            f"({', '.join(f'`{k}={v}`' for k, v in s.config_changes.items())}), and it loads with plain "
            f"transformers. " + ("Its weights were then fine-tuned to recover quality (see Recovery)."
                                 if report.recovery else "No weight was retrained."))


def _intro(report: Report) -> str:
    base = report.base_model or report.model or "a causal language model"
    if report.structure:
        return _structured_intro(report, base)
    method = METHOD_NAMES.get(report.method, report.method)
    pattern = report.pattern
    sparsity = report.achieved_sparsity
    title = f"# {base.rsplit('/', 1)[-1]}, {_pct(sparsity, 0)} sparse ({method}, {pattern})"
    base_link = f"[{base}](https://huggingface.co/{base})" if "/" in base else f"`{base}`"
    pattern_words = "an unstructured" if pattern == "unstructured" else f"a semi-structured {pattern} (N:M)"
    retrained = ("Its surviving weights were then fine-tuned to recover quality (see Recovery)."
                 if report.recovery else "No weight was retrained.")
    return (f"{title}\n\n"
            f"{base_link} with {_pct(sparsity)} of the weights of its linear layers set to zero by one-shot "
            f"**{method}** pruning, with {pattern_words} sparsity pattern and {report.allocation} "
            f"allocation across layers, made with [llmprune](https://pypi.org/project/llmprune/)"
            f"{' ' + report.llmprune_version if report.llmprune_version else ''}. {retrained}")


def _provenance(report: Report) -> str:
    lines = ["## How it was made"]
    if report.command:
        lines += ["", _code_block(report.command, "bash")]
    lines.append("")
    calibration = report.calibration
    if calibration:
        lines.append(f"- Calibration: {calibration.nsamples} sequences of {calibration.seqlen} tokens "
                     f"from `{calibration.source}` (seed {calibration.seed}).")
    if report.architecture:
        lines.append(f"- Architecture: `{report.architecture}`.")
    seconds = report.seconds or {}
    if seconds:
        lines.append("- Time: " + ", ".join(f"{stage} {value:.0f} s" for stage, value in seconds.items()) + ".")
    if report.peak_rss_bytes:
        lines.append(f"- Peak memory (RSS): {report.peak_rss_bytes / 2**30:.2f} GiB.")
    versions = report.versions or {}
    if versions:
        lines.append("- Software: " + ", ".join(f"{name} {version}" for name, version in versions.items()) + ".")
    return "\n".join(lines)


def _layer_summary(layers: list[dict]) -> str:
    if not layers:
        return ""
    # Aggregate per decoder block (the first ".N." in a module name), parameter-weighted, so the table has one
    # row per block instead of one per matrix; matrices outside the blocks (e.g. lm_head) share one row.
    groups: dict[int | None, list[dict]] = {}
    for layer in layers:
        groups.setdefault(layer["layer"], []).append(layer)
    ratios = [layer["achieved_sparsity"] for layer in layers]
    lines = ["## Sparsity per layer", "",
             f"Over the {len(layers)} pruned matrices ({_count(sum(_numel(layer) for layer in layers))} parameters): "
             f"min {_pct(min(ratios))}, mean {_pct(sum(ratios) / len(ratios))}, max {_pct(max(ratios))}.", "",
             _row(["decoder layer", "matrices", "parameters", "sparsity", "min", "max"]),
             _row(["---"] * 6)]
    for index in sorted(groups, key=lambda key: (key is None, key or 0)):
        members = groups[index]
        numel = sum(_numel(layer) for layer in members)
        zeros = sum(_numel(layer) * layer["achieved_sparsity"] for layer in members)
        member_ratios = [layer["achieved_sparsity"] for layer in members]
        lines.append(_row(["other" if index is None else index, len(members), _count(numel),
                           _pct(zeros / numel if numel else 0.0), _pct(min(member_ratios)), _pct(max(member_ratios))]))
    return "\n".join(lines)


def _evaluation(report: Report) -> str:
    perplexity = asdict(report.perplexity) if report.perplexity else None
    zero_shot = report.zero_shot
    if not perplexity and not zero_shot:
        return ""
    lines = ["## Evaluation"]
    if perplexity:
        columns = ["dense", "pruned"] + (["recovered"] if perplexity.get("recovered") is not None else [])
        label = (f"perplexity on {perplexity.get('dataset')} (seqlen {perplexity.get('seqlen')}, "
                 f"{perplexity.get('windows')} windows), lower is better")
        lines += ["", _row(["metric", *columns]), _row(["---"] * (len(columns) + 1)),
                  _row([label, *(_number(perplexity.get(column)) for column in columns)])]
    if zero_shot:
        dense = (report.zero_shot_dense or {}).get("tasks", {})
        columns = (["dense"] if dense else []) + ["pruned"]
        lines += ["", "Zero-shot accuracy (lm-evaluation-harness):", "",
                  _row(["task", *columns]), _row(["---"] * (len(columns) + 1))]
        for task, scores in zero_shot.get("tasks", {}).items():
            cells = ([_accuracy(dense.get(task))] if dense else []) + [_accuracy(scores)]
            lines.append(_row([task, *cells]))
        if zero_shot.get("mean_acc") is not None:
            dense_mean = (report.zero_shot_dense or {}).get("mean_acc")
            cells = ([_number(dense_mean, 3)] if dense else []) + [_number(zero_shot["mean_acc"], 3)]
            lines.append(_row(["**mean**", *cells]))
    return "\n".join(lines)


def _recovery(recovery: dict | None) -> str:
    if not recovery:
        return ""
    items = [f"- {key}: {value}" for key, value in recovery.items() if not isinstance(value, (dict, list))]
    lines = ["## Recovery", "", *items]
    if recovery.get("adapter"):
        lines += ["", f"The unmerged LoRA adapter is in `{recovery['adapter']}/` (peft format), for inspection or further "
                  "training. Its low-rank update is dense: applied with plain peft (to this model or the base one) it "
                  "would fill the pruned zeros again. llmprune trained and merged it through the pruning mask, and "
                  "the weights in this folder are that result: load them, not the adapter, to get the sparse model."]
    return "\n".join(lines)


def _usage(target: str) -> str:
    code = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({json.dumps(target)})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(target)})")
    return "## How to use\n\n" + _code_block(code, "python")


def _storage_note(pattern: str) -> str:
    note = ("## Sparse weights are stored densely\n\n"
            "The pruned weights are zeros inside ordinary dense tensors: the checkpoint is as large as the original "
            "and runs at the same speed with standard kernels. Speedups need sparse kernels or a sparse-aware runtime.")
    if pattern == "2:4":
        note += (" The 2:4 pattern of this model can be accelerated by the sparse tensor cores of NVIDIA Ampere and "
                 "newer GPUs (for example with `torch.sparse.to_sparse_semi_structured`), but only large matrix "
                 "products gain: on an H100 with PyTorch 2.11 a 11008 x 4096 product over 32k tokens ran 1.2x "
                 "faster, and products of a small model's size ran slower than dense.")
    else:
        note += " Only the 2:4 pattern is accelerated by the sparse tensor cores of NVIDIA Ampere and newer GPUs."
    return note


def _code_block(text: str, language: str) -> str:
    # A fence longer than any backtick run inside, so a command containing ``` cannot end the block early.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def _row(cells: list) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _numel(layer: dict) -> int:
    numel = 1
    for size in layer.get("shape", []):
        numel *= size
    return numel


def _pct(ratio: float | None, digits: int = 2) -> str:
    return "n/a" if ratio is None else f"{ratio:.{digits}%}"


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _accuracy(scores: dict | None) -> str:
    if not scores or scores.get("acc") is None:
        return "n/a"
    stderr = scores.get("acc_stderr")
    return f"{scores['acc']:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# ---------------------------------------------------------------- push


def check_push(repo_id: str, token: str | None = None) -> str:
    """Check the repo id and find the token (argument, HF_TOKEN, then the stored login) before any work;
    a pruning run calls this first so that a long run cannot end in a refused push."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not re.fullmatch(r"[^/]+/[^/]+", repo_id or ""):
        raise LLMPruneError(f"--repo-id must look like owner/name (got '{repo_id}')")
    try:  # the Hub's own naming rules, checked here so that no request is made with a name it would refuse
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise LLMPruneError(f"--repo-id owner/name: {exc}") from None
    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise LLMPruneError("no Hugging Face token: set HF_TOKEN to a token with write access, or run `hf auth login`")
    return token


def push(output_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None) -> str:
    """Upload an llmprune output directory to the Hub model repo `repo_id` (created if needed); returns its URL.

    Everything is checked before the first request, and nothing in `output_dir` is written, on success or failure.
    An untouched llmprune card is published with `repo_id` in its loading snippet; an edited one as it is.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    token = check_push(repo_id, token)
    output_dir = Path(output_dir)
    report = _read_output(output_dir)

    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
                  for name, content in _files_to_upload(output_dir, report, repo_id)]
    # HF_ENDPOINT is read now rather than at huggingface_hub's import, so a changed environment is honoured.
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    api = HfApi(endpoint=endpoint, token=token, library_name="llmprune", library_version=report.llmprune_version)
    message = commit_message or (f"Upload {report.method} {report.pattern} pruned model "
                                 f"({_pct(report.achieved_sparsity, 0)} sparse)")
    try:
        url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        if private:  # create_repo leaves an existing repo's visibility as it was
            api.update_repo_settings(repo_id, private=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        # One commit of explicit operations (rather than upload_folder) so the card can be swapped in memory.
        api.create_commit(repo_id, operations, commit_message=message, revision=revision, repo_type="model")
    except Exception as exc:
        error = _hub_error(exc, api.endpoint, repo_id, token)
        if error is None:
            raise
        # `from None`: the chained huggingface_hub exception would print request details we do not control.
        raise error from None
    return url if revision is None else f"{url}/tree/{quote(revision, safe='')}"


def _read_output(output_dir: Path) -> Report:
    if not output_dir.is_dir():
        raise LLMPruneError(f"{output_dir} is not a directory: push takes an llmprune output directory")
    missing = [name for name in REQUIRED_FILES if not (output_dir / name).is_file()]
    if missing:
        raise LLMPruneError(f"{output_dir} is not an llmprune output: it has no {' and no '.join(missing)}")
    return Report.load(output_dir / "report.json")


def _files_to_upload(output_dir: Path, report: Report, repo_id: str) -> list[tuple[str, str | bytes]]:
    """(path in repo, local path or content) for every file, hidden ones (.git, caches) left out."""
    files = []
    for folder, dirs, names in os.walk(output_dir):  # os.walk does not descend into linked folders
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(folder, d)))
        for name in sorted(names):
            path = Path(folder) / name
            if name.startswith(".") or path.is_symlink() or path.suffix not in OUTPUT_SUFFIXES:
                continue  # a link could point anywhere; other files are not part of what llmprune writes
            files.append((path.relative_to(output_dir).as_posix(), str(path)))
    card_path = output_dir / CARD_NAME
    if not card_path.is_file() or card_path.read_bytes() == model_card(report).encode("utf-8"):
        files = [file for file in files if file[0] != CARD_NAME]
        files.append((CARD_NAME, model_card(report, repo_id).encode("utf-8")))
    return files


def _hub_error(exc: BaseException, endpoint: str, repo_id: str, token: str) -> LLMPruneError | None:
    """A one-line LLMPruneError for a failure to talk to the Hub, found anywhere in the exception chain, else None."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    message = None
    cause: BaseException | None = exc
    while cause is not None and message is None:
        if isinstance(cause, OfflineModeIsEnabled):
            message = "HF_HUB_OFFLINE is set, so huggingface_hub makes no request: unset it to push"
        elif isinstance(cause, httpx2.TransportError):
            message = (f"cannot reach the Hub at {endpoint} ({type(cause).__name__}: {cause}); "
                       "check the network connection and HF_ENDPOINT")
        elif isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            reason = cause.server_message or cause.response.reason_phrase
            if status == 400 and str(cause.response.url).endswith("/api/validate-yaml"):
                message = f"the Hub rejected the metadata of {CARD_NAME} (the YAML front matter): {reason}"
            elif status == 401:
                message = (f"the Hub rejected the token (401): {reason}. Set HF_TOKEN to a valid token with write "
                           "access, or run `hf auth login`")
            elif status == 403:
                message = f"the token may not write to {repo_id} (403): {reason}. Use a token with write access to it"
            else:
                message = f"the Hub refused the upload to {repo_id} (HTTP {status}): {reason}"
        cause = cause.__cause__ or cause.__context__
    if message is None:
        return None
    # One line, and never the token, whatever the server or the transport put into their messages.
    return LLMPruneError(" ".join(message.split()).replace(token, "***"))
