"""Recovery training after pruning: one entry point, :func:`train_recovery`, for every recipe.

A recipe is two choices, each in its own module. What is minimised: ``lm`` (next-token cross-entropy on the text)
or ``distill`` (KL to the dense model's top-k distributions, computed before pruning by
:func:`llmprune.recovery.distill.teacher_topk`, optionally mixed with the LM loss): recovery/losses.py. What is
trained: ``lora`` (masked LoRA adapters, merged at the end) or ``full`` (the pruned linears' weights, their
gradients masked): recovery/params.py. The optimisation loop is recovery/loop.py; this module checks the inputs
against the recipe, wires the three together and writes the run's record.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from llmprune.config import RecoverConfig
from llmprune.errors import LLMPruneError
from llmprune.evaluation.perplexity import perplexity
from llmprune.inputs.models import decoder_layers
from llmprune.recovery.chunked import HeadSplit, chunked_sum, split_head
from llmprune.recovery.distill import TeacherTargets, capture_layer_outputs, output_vocab_size
from llmprune.recovery.losses import hidden_loss, next_token_labels, token_loss_share
from llmprune.recovery.loop import epoch_order, train_loop
from llmprune.recovery.params import all_decoder_linears, check_params, masked_modules, resolve_masks, trainee
from llmprune.runtime import map_large_allocations, parameter_count, peak_rss_bytes


def recovery_windows(tokens: torch.Tensor, config: RecoverConfig) -> tuple[torch.Tensor, torch.Tensor]:
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
    config: RecoverConfig,
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
    ``adapter_dir`` (LoRA only) keeps the raw, unmerged adapter; loading it with plain peft onto the pruned model
    applies the delta unmasked: the merged model is the sparse artifact.
    ``kept_layers``: for a model that lost whole decoder layers, the dense index of each surviving layer (so
    ``--distill-hidden`` matches layer outputs by their place in the dense model); None: nothing removed.

    The model comes back in eval mode, no grad flags, with exactly the zeros its masks say (checked).
    Process-wide side effect: glibc serves allocations of 1 MiB or more with their own mmap from here on
    (:func:`llmprune.runtime.map_large_allocations`): each step's activations, freed by its backward pass, were
    otherwise kept on glibc's heaps and the next step's landed beside them: a peak well above one step's needs,
    traded for some time a step in page faults (docs/results.md, the recovery of the channel prune).
    """
    map_large_allocations()
    device = next(model.parameters()).device
    _check_windows(train_windows, val_windows, config)
    _check_teacher(model, train_windows, teacher, config)
    _check_checkpointing(model, config)
    if adapter_dir is not None and config.params != "lora":
        raise LLMPruneError("--keep-adapter keeps a LoRA adapter: it needs --recover-params lora")
    matched = _matched_layers(model, teacher, config, kept_layers)  # dense layer -> student layer
    masks = resolve_masks(model, masks)
    modules = masked_modules(model, masks)
    check_params(model, config, modules)

    order = epoch_order(len(train_windows), config.steps * config.batch, config.seed).view(config.steps, config.batch)
    train_windows = train_windows.to(device)
    # The head and loss a chunk of tokens at a time where the model splits cleanly (recovery/chunked.py).
    split = split_head(model, train_windows[:1]) if config.loss_chunk else None
    zeros_before = _zero_count(modules)
    if config.gradient_checkpointing:
        # Non-reentrant (the default): works with frozen inputs (LoRA, frozen embeddings) as they are.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        # The student's matched layer outputs land in student_outputs on every forward (--distill-hidden only).
        with capture_layer_outputs(model, tuple(matched.values())) as student_outputs, \
                trainee(model, config, masks, modules, adapter_dir) as trained:
            step_loss = _step_loss(trained.model, train_windows, config, teacher, split, matched, student_outputs)
            validate = _validation(trained.model, val_windows, device) if val_windows is not None else None
            trained.model.train()
            result = train_loop(trained.params, order, step_loss, lr=config.lr, weight_decay=config.weight_decay,
                                tokens_per_step=config.batch * config.seqlen, validate=validate,
                                eval_every=config.eval_every, progress=progress,
                                desc=f"recovery ({config.params} + {config.loss})")
    finally:
        if config.gradient_checkpointing:
            model.activation_checkpointing_disable()
            model.disable_input_require_grads()  # peft adds these hooks to a checkpointed model it wraps
    record = _record(config, result, split, teacher, matched) | {"trained_parameters": parameter_count(trained.params)}
    if config.params == "lora":
        record["lora"] = {"r": config.r, "alpha": config.alpha, "targets": trained.lora_targets}
    if modules:
        numel = parameter_count(module.weight for module in modules.values())
        record["sparsity_before"] = zeros_before / numel
        record["sparsity_after"] = _zero_count(modules) / numel
    return record


def _step_loss(trainee_model: nn.Module, windows: torch.Tensor, config: RecoverConfig, teacher: TeacherTargets | None,
               split: HeadSplit | None, matched: dict[int, int], student_outputs: dict[int, torch.Tensor]):
    """The function from a batch of window indices to that batch's loss, as the recipe says."""
    device = windows.device

    def loss_of(window_indices: torch.Tensor) -> torch.Tensor:
        ids = windows[window_indices.to(device)]
        rows = [next_token_labels(ids)]
        if config.loss == "distill":
            rows += [t.to(device) for t in teacher.rows(window_indices)]
        share = functools.partial(token_loss_share, loss=config.loss, alpha=config.distill_alpha,
                                  temperature=config.distill_temperature, step_tokens=ids.numel(),
                                  step_predicted=ids.numel() - len(ids))
        # bf16: the matmuls in bfloat16; the losses take float32 logits.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            if split is None:
                logits = trainee_model(input_ids=ids, use_cache=False).logits
                loss = share(logits.flatten(0, 1), *(row.flatten(0, 1) for row in rows))
            else:
                hidden = split.decoder(input_ids=ids, use_cache=False).last_hidden_state
                loss = chunked_sum(hidden, split.head, share, tuple(rows), config.loss_chunk)
        if matched:
            dense_outputs = teacher.hidden_rows(window_indices)
            loss = loss + config.distill_hidden * hidden_loss([student_outputs[s] for s in matched.values()],
                                                              [dense_outputs[t] for t in matched])
        return loss

    return loss_of


def _validation(trainee_model: nn.Module, val_windows: torch.Tensor, device: torch.device):
    def validate() -> float:
        trainee_model.eval()
        try:
            return perplexity(trainee_model, val_windows, device, progress=False)
        finally:
            trainee_model.train()

    return validate


def _record(config: RecoverConfig, result: dict, split: HeadSplit | None, teacher: TeacherTargets | None,
            matched: dict[int, int]) -> dict:
    record = {
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
        record |= {"temperature": config.distill_temperature, "alpha": config.distill_alpha, "topk": teacher.topk}
    if matched:
        record["hidden"] = {"weight": config.distill_hidden, "dense_layers": list(matched),
                            "student_layers": list(matched.values())}
    return record


def check_recovery(model: nn.Module, config: RecoverConfig, structured: bool = False) -> None:
    """The checks :func:`train_recovery` makes on the model, made on the dense model right after loading, so a
    recipe this model cannot run fails before the teacher pass and the prune: gradient checkpointing support, and
    for ``params="full"`` float weights and room for their gradients, optimizer state and masks (the decoder's
    linears for a sparse prune; every weight when ``structured``: an upper bound, the pruned model is smaller)."""
    _check_checkpointing(model, config)
    check_params(model, config, {} if structured else all_decoder_linears(model))


def _check_checkpointing(model: nn.Module, config: RecoverConfig) -> None:
    if config.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise LLMPruneError(f"{type(model).__name__} does not support gradient checkpointing: drop "
                            f"--gradient-checkpointing")


def _check_windows(train_windows: torch.Tensor, val_windows: torch.Tensor | None, config: RecoverConfig) -> None:
    for name, windows in (("training", train_windows), ("validation", val_windows)):
        if windows is None and name == "validation":
            continue
        if windows.dim() != 2 or windows.dtype != torch.long or windows.shape[0] == 0 or (
            name == "training" and windows.shape[1] != config.seqlen
        ):
            raise LLMPruneError(f"recovery {name} windows must be a LongTensor [n_windows, seqlen={config.seqlen}], "
                                f"got {windows.dtype} {list(windows.shape)}: cut them with recovery_windows()")
    if len(train_windows) < config.steps * config.batch:
        raise LLMPruneError(
            f"recovery asks for {config.steps} steps x {config.batch} windows of {config.seqlen} tokens "
            f"({config.tokens} tokens), but only {len(train_windows)} windows ({train_windows.numel()} tokens) were "
            f"given: lower --recover-steps or --recover-batch, or give a larger --recover-data"
        )


def _check_teacher(model: nn.Module, train_windows: torch.Tensor, teacher: TeacherTargets | None,
                   config: RecoverConfig) -> None:
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


def _matched_layers(model: nn.Module, teacher: TeacherTargets | None, config: RecoverConfig,
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


def _zero_count(modules: dict[str, nn.Module]) -> int:
    return sum(int((module.weight == 0).sum()) for module in modules.values())
