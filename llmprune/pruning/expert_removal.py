"""--structure experts: remove whole routed experts from every MoE layer; the output is an ordinary smaller model.

Each expert is scored over the calibration tokens on the dense model, in one pass of the model's own forward:
    reap:      the mean, over the tokens routed to the expert, of its routing weight times the L2 norm of its
               output (REAP, Lasby et al., Cerebras 2025: what the expert adds to the layer's output, as routed)
    frequency: the number of tokens routed to it
The same number of lowest-scored experts goes from every MoE layer, so the config's one expert count still
describes every layer (and, with grouped routing, the same number from every group, so the groups stay equal):
the fused experts' rows, the router's rows (and its per-expert biases or buffers) and the count keys of the config
shrink; the number of experts per token stays. The smaller model computes what the dense
one computes with the removed experts' router logits at minus infinity, before the family's renormalisation.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LLMPruneError
from .experts import ExpertBlock, _routing, find_expert_blocks, is_router
from .masks import pruned_count

IMPORTANCES = ("reap", "frequency")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")
GROUP_KEYS = ("n_group", "num_expert_group")  # grouped routing: experts in fixed groups of equal size
GROUPS_CHOSEN_KEYS = ("topk_group",)  # how many groups a token's experts come from
GROUP_SCORE_EXPERTS = 2  # a grouped router scores a group by its best two experts (DeepSeek-V3): each keeps two


def check_expert_removal(config) -> None:
    """The settings of --structure experts, before any model is loaded: the first problem found, in one line."""
    problems = (
        (config.remove_params is not None,
         "--structure experts takes --sparsity (the fraction of experts removed), not --remove-params"),
        (config.method is not None, f"--method {config.method} scores weights; --structure experts scores experts "
                                    f"by --expert-importance ({' or '.join(IMPORTANCES)}): drop --method"),
        (config.expert_importance not in IMPORTANCES,
         f"--expert-importance must be one of {', '.join(IMPORTANCES)} (got '{config.expert_importance}')"),
        (config.sparsity is not None and not 0 < config.sparsity < 1,
         f"--sparsity of --structure experts must be in (0, 1) (got {config.sparsity})"),
    )
    for failed, message in problems:
        if failed:
            raise LLMPruneError(message)


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _first_key(config, keys):
    values = config.to_dict()
    return next((key for key in keys if values.get(key) is not None), None)


def expert_blocks(model) -> tuple[nn.ModuleList, list[tuple[int, ExpertBlock]]]:
    from ..inputs.models import decoder_layers

    prefix, layers = decoder_layers(model)
    hidden = getattr(_text_config(model), "hidden_size", None)
    found = [(i, block) for i, layer in enumerate(layers) for block in find_expert_blocks(layer, f"{prefix}.{i}", hidden)]
    if not found:
        raise LLMPruneError(f"--structure experts removes routed experts: {type(model).__name__} has none")
    if any(not isinstance(block, ExpertBlock) for _, block in found):
        raise LLMPruneError("--structure experts needs fused experts (transformers 5 layouts); this model keeps "
                            "them as a list of modules")
    return layers, found


@torch.inference_mode()
def expert_scores(model, calibration: torch.Tensor, batch_size: int, progress: bool = False) -> dict[str, dict]:
    """{block name: {"tokens": [routed tokens per expert], "reap": [mean routing weight x output norm]}} over the
    calibration windows, from the dense model's own forward."""
    _, found = expert_blocks(model)
    sums = {block.name: (torch.zeros(block.num_experts, dtype=torch.float64),
                         torch.zeros(block.num_experts, dtype=torch.int64)) for _, block in found}

    def watch(block):
        def hook(module, args, kwargs, output):
            hidden, chosen, weights = _routing(args, kwargs)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            chosen, weights = chosen.reshape(len(hidden), -1), weights.reshape(len(hidden), -1)
            reap, tokens = sums[block.name]
            for expert in range(block.num_experts):
                token, slot = torch.where(chosen == expert)
                if len(token):
                    norms = block.output(hidden[token], expert).double().norm(dim=-1)
                    reap[expert] += float((weights[token, slot].double() * norms).sum())
                    tokens[expert] += len(token)

        return block.module.register_forward_hook(hook, with_kwargs=True)

    device = next(p.device for p in model.parameters())
    handles = [watch(block) for _, block in found]
    try:
        for start in tqdm(range(0, len(calibration), batch_size), desc="expert scores", unit="batch",
                          disable=not progress):
            model(input_ids=calibration[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: {"tokens": tokens.tolist(), "reap": (reap / tokens.clamp_min(1)).tolist()}
            for name, (reap, tokens) in sums.items()}


def removal_plan(scores: dict[str, dict], importance: str, remove: int, groups: int = 1) -> dict[str, list[int]]:
    """{block: the `remove` lowest-scored experts of each of its `groups` equal, contiguous groups}; ties go by
    position (the lower index first)."""
    plan = {}
    for name, block_scores in scores.items():
        values = torch.tensor(block_scores["tokens" if importance == "frequency" else "reap"], dtype=torch.float64)
        size = len(values) // groups
        plan[name] = sorted(start + int(e) for start in range(0, len(values), size)
                            for e in values[start : start + size].argsort(stable=True)[:remove])
    return plan


def _shrink(module: nn.Module, keep: torch.Tensor, count: int) -> None:
    """Keep rows `keep` of every parameter and buffer of `module` (not of its children) with `count` rows."""
    for name, parameter in list(module.named_parameters(recurse=False)):
        if parameter.dim() and parameter.shape[0] == count:
            setattr(module, name, nn.Parameter(parameter.data[keep].clone(), requires_grad=parameter.requires_grad))
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer.dim() and buffer.shape[0] == count:
            module._buffers[name] = buffer[keep].clone()
    if getattr(module, "num_experts", None) == count:
        module.num_experts = len(keep)


def remove_experts(model, calibration: torch.Tensor, config, progress: bool = False) -> dict:
    """Remove round(sparsity x experts) experts from every MoE layer in place; returns the structure record."""
    text = _text_config(model)
    layers, found = expert_blocks(model)
    counts = {block.num_experts for _, block in found}
    if len(counts) != 1:
        raise LLMPruneError(f"--structure experts needs the same expert count in every MoE layer (found {counts})")
    count = counts.pop()
    top_k = getattr(text, _first_key(text, TOP_K_KEYS) or "num_experts_per_tok", None)
    group_key = _first_key(text, GROUP_KEYS)
    groups = getattr(text, group_key) if group_key else 1
    per_group = pruned_count(count // groups, config.sparsity)  # the same from every group keeps them equal
    remove = per_group * groups
    if remove == 0:
        raise LLMPruneError(f"--sparsity {config.sparsity:g} of {count} experts removes none: raise it")
    chosen_groups = getattr(text, _first_key(text, GROUPS_CHOSEN_KEYS) or "topk_group", None) or groups
    if top_k and (count - remove) * chosen_groups // groups < top_k:
        raise LLMPruneError(f"--sparsity {config.sparsity:g} leaves {count - remove} experts, fewer than the "
                            f"{top_k} each token is routed to (from {chosen_groups} of {groups} groups): lower it")
    if groups > 1 and count // groups - per_group < GROUP_SCORE_EXPERTS:
        raise LLMPruneError(f"--sparsity {config.sparsity:g} leaves fewer than {GROUP_SCORE_EXPERTS} experts in "
                            f"each of the {groups} routing groups ({group_key}), which the router scores by "
                            f"their best {GROUP_SCORE_EXPERTS}: lower it")
    params_before, decoder_before = (sum(p.numel() for p in m.parameters()) for m in (model, layers))
    scores = expert_scores(model, calibration, config.batch_size, progress)
    plan = removal_plan(scores, config.expert_importance, per_group, groups)
    for i, block in found:
        keep = torch.tensor([e for e in range(count) if e not in plan[block.name]], dtype=torch.long)
        _shrink(block.module, keep, count)
        parent = layers[i].get_submodule(block.name.split(f".{i}.", 1)[1].rsplit(".", 1)[0])
        for name, child in parent.named_children():
            if is_router(f".{name}"):
                _shrink(child, keep, count)
    changes = {key: count - remove for key in EXPERT_COUNT_KEYS if text.to_dict().get(key) == count}
    for key in changes:
        setattr(text, key, count - remove)
    params_after, decoder_after = (sum(p.numel() for p in m.parameters()) for m in (model, layers))
    return {"kind": "experts", "method": config.expert_importance, "sparsity": config.sparsity,
            "units_before": count, "units_kept": count - remove, "achieved_sparsity": remove / count, "groups": groups,
            "removed_experts": plan, "scores": scores, "config_changes": changes, "unit": "experts",
            "layers": [{"index": i, "kept": count - remove, "removed": plan[block.name]} for i, block in found],
            "params_before": params_before, "params_after": params_after,
            "params_removed_fraction": 1 - params_after / params_before, "decoder_params_before": decoder_before,
            "decoder_params_after": decoder_after, "decoder_params_removed_fraction": 1 - decoder_after / decoder_before}


def expert_removal_report(model, calibration: torch.Tensor, config, progress: bool = False):
    """remove_experts as the pipeline's PruneReport, its record the report's typed `structure` (each MoE layer's
    kept count and removed experts in `layers`)."""
    from ..report import StructureRecord
    from .runner import PruneReport

    report = PruneReport(config.expert_importance, config.sparsity, "structured", "uniform")
    report.structure = StructureRecord.from_dict(remove_experts(model, calibration, config, progress))
    return report
