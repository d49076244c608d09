"""Recovery training after pruning: one entry point, :func:`train_recovery`, for every recipe.

Two choices make a recipe. The loss: ``lm`` (next-token cross-entropy on the text) or ``distill`` (KL to the dense
model's top-k distributions, computed before pruning by :func:`llmprune.recovery.distill.teacher_topk`, optionally
mixed with the LM loss). The parameters: ``lora`` (masked LoRA adapters, merged at the end: recovery/lora.py) or
``full`` (every weight of every pruned linear, its gradient masked so pruned zeros stay exactly zero; for a
structurally smaller model, which has no mask, every weight of the model).

Why a gradient mask and nothing else keeps the zeros: a masked weight's gradient is 0, so AdamW's moments for it
stay 0 and its update is 0 / (sqrt(0) + eps) = 0; decoupled weight decay scales the weight, and 0 scaled is 0. The
mask is not re-applied after training, so the check that follows can catch a leak.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.evaluation.perplexity import perplexity
from llmprune.inputs.models import decoder_layers, linears
from llmprune.recovery.distill import (TeacherTargets, capture_layer_outputs, distill_loss, hidden_loss,
                                      output_vocab_size)
from llmprune.config import RecoverConfig
from llmprune.recovery.chunked import chunked_sum, split_head
from llmprune.recovery.lora import find_pruned_linears, train_masked_lora
from llmprune.recovery.loop import epoch_order, train_loop
from llmprune.runtime import available_memory_bytes, peak_rss_bytes



RecoveryConfig = RecoverConfig  # one recipe: llmprune.config.RecoverConfig (loss, params, budget, LoRA, KL)


def recovery_windows(tokens: torch.Tensor, config: RecoveryConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) windows of ``config.seqlen`` from a 1-D token tensor (the training part of a text, never its
    held-out part): non-overlapping; the validation slice is the text's last ``val_windows`` windows, and the
    ``steps x batch`` training windows are drawn (seeded) from the rest, so each is used once.

    The budget check: a text too short for the tokens asked is an error here, before any teacher pass or pruning.
    """
    count = tokens.numel() // config.seqlen
    needed = config.steps * config.batch + config.val_windows
    if count < needed:
        raise LLMPruneError(
            f"recovery asks for {config.steps} steps x {config.batch} windows + {config.val_windows} validation "
            f"windows of {config.seqlen} tokens ({needed * config.seqlen} tokens), but the recovery text holds "
            f"{tokens.numel()} tokens ({count} windows): lower --recover-steps or --recover-batch, or give a larger "
            f"--recover-data"
        )
    windows = tokens[: count * config.seqlen].view(count, config.seqlen)
    pool, val = windows[: count - config.val_windows], windows[count - config.val_windows :]
    chosen = torch.randperm(len(pool), generator=torch.Generator().manual_seed(config.seed))[: needed - len(val)]
    return pool[chosen.sort().values], val


def train_recovery(
    model: nn.Module,
    train_windows: torch.Tensor,
    val_windows: torch.Tensor | None,
    config: RecoveryConfig,
    teacher: TeacherTargets | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    adapter_dir: str | Path | None = None,
    kept_layers: list[int] | None = None,
) -> dict:
    """Train the pruned ``model`` in place as ``config`` says; returns the record of the run.

    ``train_windows`` [n, seqlen] with n >= steps x batch (each used at most once, in a seeded order);
    ``val_windows`` [m, seqlen] are scored (perplexity) before training, every ``eval_every`` steps and at the end.
    ``teacher``: targets from ``teacher_topk`` on exactly ``train_windows``, needed by ``loss="distill"``.
    ``masks``: module name -> bool tensor of the weight's shape (True where a weight is kept), e.g. from the
    runner's pruned linears; None finds them from the zeros of the decoder linears; ``{}`` declares a structurally
    pruned (smaller, dense) model: LoRA then adapts every decoder linear, full trains every weight.
    ``adapter_dir`` (LoRA only) keeps the raw adapter, as recover_lora does.
    ``kept_layers``: for a model that lost whole decoder layers, the dense index of each surviving layer (so
    ``--distill-hidden`` matches layer outputs by their place in the dense model); None: nothing removed.

    The model comes back in eval mode, no grad flags, with exactly the zeros its masks say (checked).
    """
    device = next(model.parameters()).device
    _check_windows(train_windows, val_windows, config)
    _check_teacher(model, train_windows, teacher, config)
    _check_checkpointing(model, config)
    matched = _matched_layers(model, teacher, config, kept_layers)  # dense layer -> student layer
    if masks is None:
        found = find_pruned_linears(model)
        if not found:
            raise LLMPruneError("no pruned linear layers found (no exact zeros): prune the model before recovery, or "
                                "pass masks={} for a structurally pruned model")
        masks = {name: module.weight != 0 for name, module in found.items()}
    if adapter_dir is not None and config.params != "lora":
        raise LLMPruneError("--keep-adapter keeps a LoRA adapter: it needs --recover-params lora")
    modules = _masked_modules(model, masks)
    trained = _full_parameters(model, modules) if config.params == "full" else None
    if trained is not None:
        _check_full_fits(trained, sum(mask.numel() for mask in masks.values()), device)

    order = epoch_order(len(train_windows), config.steps * config.batch, config.seed).view(config.steps, config.batch)
    train_windows = train_windows.to(device)
    desc = f"recovery ({config.params} + {config.loss})"

    # The head and loss a chunk of tokens at a time where the model splits cleanly (recovery/chunked.py).
    split = split_head(model, train_windows[:1]) if config.loss_chunk else None

    def autocast():  # bf16: the matmuls in bfloat16; the losses take float32 logits
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    def run(trainee: nn.Module, params: list[nn.Parameter]) -> dict:
        def loss_of(window_indices: torch.Tensor) -> torch.Tensor:
            ids = train_windows[window_indices.to(device)]
            labels = torch.cat([ids[:, 1:], ids.new_full((len(ids), 1), -100)], dim=1)  # -100: no next token
            rows = [labels] + ([t.to(device) for t in teacher.rows(window_indices)] if config.loss == "distill" else [])

            def token_losses(logits: torch.Tensor, labels: torch.Tensor, *targets: torch.Tensor) -> torch.Tensor:
                """These tokens' share of the step's mean loss (logits [n, vocab], rows [n, ...]): the shares of
                a step's chunks add up to it."""
                logits = logits.float()
                if config.loss == "lm" or config.distill_alpha:
                    lm = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / (ids.numel() - len(ids))
                    if config.loss == "lm":
                        return lm
                kl = distill_loss(logits, *targets, config.distill_temperature) * len(logits) / ids.numel()
                return (1 - config.distill_alpha) * kl + config.distill_alpha * lm if config.distill_alpha else kl

            with autocast():
                if split is None:
                    logits = trainee(input_ids=ids, use_cache=False).logits
                    loss = token_losses(logits.flatten(0, 1), *(row.flatten(0, 1) for row in rows))
                else:
                    hidden = split.decoder(input_ids=ids, use_cache=False).last_hidden_state
                    loss = chunked_sum(hidden, split.head, token_losses, tuple(rows), config.loss_chunk)
            if matched:
                dense_outputs = teacher.hidden_rows(window_indices)
                loss = loss + config.distill_hidden * hidden_loss([student_outputs[s] for s in matched.values()],
                                                                  [dense_outputs[t] for t in matched])
            return loss

        def validate() -> float:
            trainee.eval()
            try:
                return perplexity(trainee, val_windows, device, progress=False)
            finally:
                trainee.train()

        trainee.train()
        result = train_loop(params, order, loss_of, lr=config.lr, weight_decay=config.weight_decay,
                            tokens_per_step=config.batch * config.seqlen,
                            validate=validate if val_windows is not None else None, eval_every=config.eval_every,
                            progress=progress, desc=desc)
        return result | {"trained_parameters": sum(p.numel() for p in params)}

    zeros_before = _zero_count(model, modules)
    if config.gradient_checkpointing:
        # Non-reentrant (the default): works with frozen inputs (LoRA, frozen embeddings) as they are.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # The student's matched layer outputs land in student_outputs on every forward (--distill-hidden only).
    with capture_layer_outputs(model, tuple(matched.values())) as student_outputs:
        try:
            if config.params == "lora":
                lora = config
                result, targets = train_masked_lora(
                    model, modules or _all_decoder_linears(model), lora,
                    lambda peft_model: run(peft_model, [p for p in peft_model.parameters() if p.requires_grad]),
                    adapter_dir=adapter_dir,
                )
            else:
                result, targets = _train_full(model, modules, masks, trained, run), None
        finally:
            if config.gradient_checkpointing:
                model.activation_checkpointing_disable()
                model.disable_input_require_grads()  # peft adds these hooks to a checkpointed model it wraps
            model.eval()
            for param in model.parameters():
                param.requires_grad_(False)
                param.grad = None

    stats = {
        "loss": config.loss,
        "params": config.params,
        "steps": config.steps,
        "batch": config.batch,
        "seqlen": config.seqlen,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "gradient_checkpointing": config.gradient_checkpointing,
        "loss_chunk": config.loss_chunk if split is not None else 0,  # 0: the model's logits whole
        "precision": config.precision,
        "tokens": config.tokens,
        "trained_parameters": result["trained_parameters"],
        "loss_first": result["losses"][0],
        "loss_last": result["losses"][-1],
        "curve": result["curve"],
        "val_ppl_first": result["curve"][0]["val_ppl"] if result["curve"] else None,
        "val_ppl_last": result["curve"][-1]["val_ppl"] if result["curve"] else None,
        "seconds": round(result["seconds"], 1),
        "validation_seconds": round(result["validation_seconds"], 1),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if config.loss == "distill":
        stats |= {"temperature": config.distill_temperature, "alpha": config.distill_alpha, "topk": teacher.topk}
    if matched:
        stats["hidden"] = {"weight": config.distill_hidden, "dense_layers": list(matched),
                           "student_layers": list(matched.values())}
    if config.params == "lora":
        stats["lora"] = {"r": config.r, "alpha": config.alpha, "targets": targets}
    if modules:
        numel = sum(module.weight.numel() for module in modules.values())
        stats["sparsity_before"] = zeros_before / numel
        stats["sparsity_after"] = _zero_count(model, modules) / numel
    return stats


def check_recovery(model: nn.Module, config: RecoveryConfig, structured: bool = False) -> None:
    """The checks :func:`train_recovery` makes on the model, made on the dense model right after loading, so a
    recipe this model cannot run fails before the teacher pass and the prune: gradient checkpointing support, and
    for ``params="full"`` float weights and room for their gradients, optimizer state and masks (the decoder's
    linears for a sparse prune; every weight when ``structured``: an upper bound, the pruned model is smaller)."""
    _check_checkpointing(model, config)
    if config.params == "full":
        modules = {} if structured else _all_decoder_linears(model)
        params = _full_parameters(model, modules)
        _check_full_fits(params, sum(module.weight.numel() for module in modules.values()),
                         next(model.parameters()).device)


def _check_checkpointing(model: nn.Module, config: RecoveryConfig) -> None:
    if config.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise LLMPruneError(f"{type(model).__name__} does not support gradient checkpointing: drop "
                            f"--gradient-checkpointing")


def _check_windows(train_windows: torch.Tensor, val_windows: torch.Tensor | None, config: RecoveryConfig) -> None:
    for name, windows in (("training", train_windows), ("validation", val_windows)):
        if windows is None and name == "validation":
            continue
        if windows.dim() != 2 or windows.dtype != torch.long or windows.shape[0] == 0 or (
            name == "training" and windows.shape[1] != config.seqlen
        ):
            raise LLMPruneError(f"recovery {name} windows must be a LongTensor [n_windows, {config.seqlen}], got "
                                f"{windows.dtype} {list(windows.shape)}: cut them with recovery_windows()")
    if len(train_windows) < config.steps * config.batch:
        raise LLMPruneError(
            f"recovery asks for {config.steps} steps x {config.batch} windows of {config.seqlen} tokens "
            f"({config.tokens} tokens), but only {len(train_windows)} windows ({train_windows.numel()} tokens) were "
            f"given: lower --recover-steps or --recover-batch, or give a larger --recover-data"
        )


def _check_teacher(model: nn.Module, train_windows: torch.Tensor, teacher: TeacherTargets | None,
                   config: RecoveryConfig) -> None:
    if config.loss == "lm":
        if teacher is not None:
            raise LLMPruneError("teacher targets were given but the recovery loss is lm: use loss='distill'")
        if config.distill_hidden:
            raise LLMPruneError("--distill-hidden adds to the distillation loss: use loss='distill'")
        return
    if teacher is None:
        raise LLMPruneError("distillation needs the dense model's targets: call teacher_topk(model, train_windows, "
                            "...) before pruning and pass them as teacher=")
    vocab = output_vocab_size(model)
    if teacher.vocab_size != vocab:
        raise LLMPruneError(f"the teacher's vocabulary has {teacher.vocab_size} tokens but the student's has {vocab}: "
                            f"distil from the same model family and tokenizer (the dense model before pruning)")
    if teacher.topk != min(config.distill_topk, vocab):
        raise LLMPruneError(f"the teacher targets hold the top {teacher.topk} tokens but --distill-topk is "
                            f"{config.distill_topk}: compute them again with k={config.distill_topk}")
    if teacher.temperature != config.distill_temperature:
        raise LLMPruneError(f"the teacher targets were computed at temperature {teacher.temperature:g} but "
                            f"--distill-temperature is {config.distill_temperature:g}: compute them again at that temperature")
    if config.distill_hidden:
        if not teacher.hidden_layers:
            raise LLMPruneError("--distill-hidden needs the dense model's layer outputs: compute the teacher targets "
                                "with teacher_topk(..., hidden_layers=...)")
        width = model.get_input_embeddings().weight.shape[-1]
        if teacher.hidden_size != width:
            raise LLMPruneError(f"the teacher's layer outputs are {teacher.hidden_size} wide but the student's are "
                                f"{width}: --distill-hidden needs the hidden size kept (prune channels, heads or "
                                f"layers, not the embedding)")
    if teacher.windows.shape != train_windows.shape or not torch.equal(teacher.windows, train_windows.cpu()):
        raise LLMPruneError("the teacher targets were computed on other windows than the training windows: pass "
                            "teacher_topk the very windows given to train_recovery (or teacher.subset for a share)")


def _matched_layers(model: nn.Module, teacher: TeacherTargets | None, config: RecoveryConfig,
                    kept_layers: list[int] | None) -> dict[int, int]:
    """--distill-hidden's pairs: dense layer index -> the student's layer that is that layer after pruning."""
    if not config.distill_hidden:
        return {}
    n_layers = len(decoder_layers(model)[1])
    kept = list(range(n_layers)) if kept_layers is None else list(kept_layers)
    if len(kept) != n_layers:
        raise LLMPruneError(f"kept_layers names {len(kept)} layers but the model has {n_layers}: pass the dense "
                            f"index of each of its layers")
    matched = {layer: kept.index(layer) for layer in teacher.hidden_layers if layer in kept}
    if not matched:
        raise LLMPruneError(f"--distill-hidden: none of the dense layers {list(teacher.hidden_layers)} whose outputs "
                            f"the teacher kept survived the prune: raise --distill-hidden-layers")
    return matched


def _masked_modules(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """The modules named in ``masks``, each checked against its mask: the same shape, and zero wherever the mask
    drops a weight (a mask the weights do not hold is a wiring error, not something to train around)."""
    modules = {}
    for name, mask in masks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LLMPruneError(f"masked module {name} is not in this model: pass the masks of this very model") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or mask.shape != weight.shape or mask.dtype != torch.bool:
            raise LLMPruneError(f"the mask of {name} must be a bool tensor of its weight's shape "
                                f"{list(weight.shape) if isinstance(weight, torch.Tensor) else None}, got "
                                f"{mask.dtype} {list(mask.shape)}")
        if bool((weight.detach()[~mask.to(weight.device)] != 0).any()):
            raise LLMPruneError(f"{name} has non-zero weights where its mask prunes them: the mask is not this "
                                f"model's (pass the masks taken right after pruning)")
        modules[name] = module
    return modules


def _all_decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    prefix, layers = decoder_layers(model)
    return {f"{prefix}.{name}": module for name, module in linears(layers).items()}


def _full_parameters(model: nn.Module, modules: dict[str, nn.Module]) -> list[nn.Parameter]:
    """What full fine-tuning trains: the masked linears' weights and biases, or, with no masks (a structurally
    smaller model), every parameter. Each must be a float tensor the optimiser can update in place."""
    if modules:
        params = [p for module in modules.values() for p in module.parameters(recurse=False)]
    else:
        params = list(dict.fromkeys(model.parameters()))  # tied weights once
    bad = [p.dtype for p in params if not p.dtype.is_floating_point]
    if bad:
        raise LLMPruneError(f"--recover-params full needs float weights, but this model holds {bad[0]} ones "
                            f"(quantized): use --recover-params lora")
    return params


def _check_full_fits(params: list[nn.Parameter], mask_numel: int, device: torch.device) -> None:
    """Full fine-tuning adds, per trained weight, a gradient and AdamW's two moments (same dtype), plus one byte of
    mask per masked weight: fail now, not mid-run, when that cannot be held."""
    needed = sum(3 * p.numel() * p.element_size() for p in params) + mask_numel
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        raise LLMPruneError(f"--recover-params full needs about {needed / 2**30:.1f} GiB more on {device} (gradients, "
                            f"optimizer state, masks) but {available / 2**30:.1f} GiB are free: use --recover-params "
                            f"lora, or --gradient-checkpointing on a larger device")


def _train_full(model: nn.Module, modules: dict[str, nn.Module], masks: dict[str, torch.Tensor],
                params: list[nn.Parameter], run) -> dict:
    for param in model.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    # The gradient is masked as it is produced, before clipping and AdamW see it.
    hooks = [module.weight.register_hook(lambda grad, keep=masks[name].to(module.weight.device): grad * keep)
             for name, module in modules.items()]
    try:
        result = run(model, params)
    finally:
        for hook in hooks:
            hook.remove()
    for name, module in modules.items():
        leaked = int((module.weight.detach()[~masks[name].to(module.weight.device)] != 0).sum())
        if leaked:
            raise LLMPruneError(f"{leaked} pruned weights of {name} became non-zero during full fine-tuning; this is "
                                f"a bug, please report it")
    return result


def _zero_count(model: nn.Module, modules: dict[str, nn.Module]) -> int:
    return sum(int((module.weight == 0).sum()) for module in modules.values())
