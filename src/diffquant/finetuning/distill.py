"""Data-free distillation of a fake-quantized denoiser (EfficientDM-style QALoRA + LSQ).

The FP denoiser is the teacher. Inputs are the teacher's own DDIM trajectories (the calibration
pool: no training data); the trajectory always advances with the teacher. The loss is the MSE
between the student's and the teacher's noise predictions at the same ``(x_t, t, label)``.
The teacher's predictions are computed once, before training (:func:`teacher_targets`, streamed
to a file beside the checkpoints), so the teacher need not stay on the device while the student
trains. A batch larger than the forward limit is split into micro-batches whose gradients add up
to the whole batch's.

Trainable: a QALoRA adapter on each selected quantized layer (merged into the weight at the
end, so the result is a plain low-bit model) and, optionally, the LSQ step sizes of their weight
and input quantizers. Batches are drawn with a generator seeded by ``(seed, step)`` and the
learning rate is a pure function of the step, so a run resumed from a checkpoint ends exactly
where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffquant.errors import DataError, DiffquantError
from diffquant.placement import module_placement, to_module
from diffquant.quant.formats import SCALE_EPS
from diffquant.quant.modules import QuantConv2d, QuantLinear
from diffquant.quant.plan import activation_quantizers, resolve_globs
from diffquant.sampling import Trajectories, denoiser_outputs
from diffquant.spec import FinetuneSpec
from diffquant.storage import (
    load_safetensors,
    mapped_safetensors,
    save_safetensors,
    sha256_file,
    stream_safetensors,
    write_json,
)

logger = logging.getLogger(__name__)

LATEST = "latest.json"
TARGETS = "teacher_targets.safetensors"
RULES = ("all", "time_embedding", "attention", "top_k")


@dataclass
class DistillResult:
    """What a run did."""

    steps: int
    resumed_from: int
    seconds: float
    trainable_parameters: int
    layers: list[str]
    first_loss: float | None = None
    last_loss: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (losses thinned to at most 200 points)."""
        stride = max(1, len(self.losses) // 200)
        return {
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "seconds": self.seconds,
            "trainable_parameters": self.trainable_parameters,
            "layers": self.layers,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "losses": self.losses[::stride],
        }


def select_layers(
    unet: nn.Module,
    rule: str = "all",
    globs: Iterable[str] = (),
    sensitivity: dict[str, float] | None = None,
    top_k: int = 8,
) -> list[str]:
    """Choose the quantized layers to train (QuEST's selective training).

    Args:
        unet: The fake-quantized denoiser.
        rule: ``all`` quantized layers, ``time_embedding`` (layers under ``time_embedding`` or
            named ``time_emb_proj``), ``attention`` (layers under an ``attentions`` block), or
            ``top_k`` most sensitive layers by ``sensitivity`` (layer -> noise).
        globs: Extra layer globs added to the rule's set.
        sensitivity: Needed by ``top_k``.
        top_k: How many layers ``top_k`` takes.

    Raises:
        ValueError: Unknown rule, ``top_k`` without sensitivities, a glob matching nothing, or an empty set.
    """
    quantized = [n for n, m in unet.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    if rule not in RULES:
        raise ValueError(f"unknown trainable rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "all":
        chosen = set(quantized)
    elif rule == "time_embedding":
        chosen = {n for n in quantized if n.startswith("time_embedding") or n.endswith("time_emb_proj")}
    elif rule == "attention":
        chosen = {n for n in quantized if ".attentions." in f".{n}."}
    else:
        if not sensitivity:
            raise ValueError("rule top_k needs a sensitivity table (an 'allocation' section in the spec)")
        ranked = sorted((n for n in quantized if n in sensitivity), key=lambda n: -sensitivity[n])
        chosen = set(ranked[:top_k])
    chosen |= resolve_globs(quantized, globs)
    if not chosen:
        raise ValueError(f"trainable rule {rule!r} selects no quantized layer")
    return [n for n in quantized if n in chosen]


def prepare_student(student: nn.Module, layers: list[str], cfg: FinetuneSpec) -> list[dict[str, Any]]:
    """Attach adapters and make scales learnable on ``layers``; freeze everything else.

    Returns:
        Optimizer parameter groups (adapters at ``lr``, scales at ``scale_lr``).
    """
    for param in student.parameters():
        param.requires_grad_(False)
    adapters, scales = [], []
    for i, name in enumerate(layers):
        layer = student.get_submodule(name)
        if layer.weight_quantizer is not None:
            layer.add_adapter(cfg.rank, cfg.alpha, seed=cfg.seed * 100_003 + i)
            adapters += [layer.lora_A, layer.lora_B]
            if cfg.learn_weight_scales:
                scales.append(layer.weight_quantizer.make_learnable())
        if cfg.learn_activation_scales:
            for quantizer in (layer.input_quantizer, layer.output_quantizer):
                if quantizer is not None:
                    scales.append(quantizer.make_learnable())
    groups = [{"params": adapters, "lr": cfg.lr, "base_lr": cfg.lr}]
    if scales:
        groups.append({"params": scales, "lr": cfg.scale_lr, "base_lr": cfg.scale_lr})
    return groups


def finalize_student(student: nn.Module) -> None:
    """Merge every adapter into its weight and turn learned scales back into buffers."""
    for module in student.modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            module.merge_adapter()
            for quantizer in (module.weight_quantizer, module.input_quantizer, module.output_quantizer):
                if quantizer is not None:
                    quantizer.freeze()
    for param in student.parameters():
        param.requires_grad_(False)


def _named_trainable(student: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in student.named_parameters() if p.requires_grad}


def _lr_factor(step: int, steps: int) -> float:
    """Cosine decay from 1 to 0.05 over the run (a pure function of the step)."""
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


def save_checkpoint(folder: Path, step: int, student: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Write trainable tensors and optimizer state at ``step`` as safetensors, then point ``latest.json`` at it."""
    target = Path(folder) / f"step-{step:07d}"
    tensors = {f"param/{k}": v.detach().clone() for k, v in _named_trainable(student).items()}
    names = list(_named_trainable(student))
    index = {id(p): names[i] for i, p in enumerate(_named_trainable(student).values())}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"optim/{index[id(param)]}/{key}"] = value.detach().clone().reshape(value.shape)
    path = save_safetensors(tensors, target / "state.safetensors")
    write_json({"step": step, "path": str(path), "sha256": sha256_file(path)}, Path(folder) / LATEST)
    return target


def load_checkpoint(folder: Path, student: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore the latest checkpoint in ``folder``; returns its step (0 when there is none).

    A checkpoint that is unreadable or does not match the sha256 recorded when it was written
    (truncated, changed) is ignored with a warning: fine-tuning starts again from step 0.
    """
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return 0
    try:
        info = json.loads(pointer.read_text())
        path = Path(info["path"])
        if not path.is_file() or sha256_file(path) != info.get("sha256"):
            raise ValueError(f"{path} is missing or does not match its recorded sha256")
        tensors = load_safetensors(path)
    except (OSError, ValueError, KeyError, TypeError, DiffquantError) as error:
        logger.warning("ignoring the fine-tuning checkpoint in %s (%s); starting from step 0", folder, error)
        return 0
    params = _named_trainable(student)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"param/{name}"])
    for name, param in params.items():
        state = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optim/{name}/")}
        if state:
            optimizer.state[param] = state
    logger.info("resuming fine-tuning from step %d (%s)", info["step"], info["path"])
    return int(info["step"])


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module, pool: Trajectories, conditional: bool, batch_size: int = 256, path: Path | None = None
) -> torch.Tensor:
    """The teacher's noise predictions on every pool input (what the student learns to match).

    Args:
        teacher: The FP denoiser.
        pool: Its trajectories (the calibration pool).
        conditional: Pass the pool's conditions.
        batch_size: Inputs per forward.
        path: A safetensors file to stream the predictions to; they are returned memory-mapped
            from it. None keeps them in memory.
    """
    teacher.eval()
    if path is None:
        return denoiser_outputs(teacher, pool, conditional, batch_size)
    with stream_safetensors(Path(path)) as stream:
        for start in range(0, len(pool), batch_size):
            rows = slice(start, start + batch_size)
            part = Trajectories(pool.x[rows], pool.t[rows], pool.labels[rows])
            stream.append("targets", denoiser_outputs(teacher, part, conditional, batch_size))
    return mapped_safetensors(Path(path))["targets"]


def accumulate_gradients(
    student: nn.Module,
    pool: Trajectories,
    targets: torch.Tensor,
    rows: torch.Tensor,
    conditional: bool,
    batch_size: int | None = None,
    step: int = 0,
) -> torch.Tensor:
    """Backpropagate the MSE of the student against ``targets`` on the pool ``rows``, ``batch_size`` rows per forward.

    Each micro-batch's mean is weighted by its share of the rows, and the activation quantizers'
    LSQ gradient scale counts the whole batch's elements (``batch_share``), so the gradients add up
    to those of the whole batch's mean (one micro-batch: exactly the whole batch's computation).

    Returns:
        The whole batch's loss (on the CPU, detached).

    Raises:
        DataError: If the loss of a micro-batch is not finite.
    """
    device, dtype = module_placement(student)
    quantizers = list(activation_quantizers(student).values())
    loss = torch.zeros(())
    try:
        for part in rows.split(batch_size or len(rows)):
            for quantizer in quantizers:
                quantizer.batch_share = len(part) / len(rows)
            x, t = to_module(pool.x[part], device, dtype), pool.t[part].to(device)
            y = pool.labels[part].to(device) if conditional else None
            target = targets[part].to(device, dtype)
            share = torch.nn.functional.mse_loss(student(x, t, y).sample, target) * (len(part) / len(rows))
            if not torch.isfinite(share):
                raise DataError(f"fine-tuning loss became {share.item()} at step {step}; lower the learning rate (lr)")
            share.backward()
            loss = loss + share.detach().cpu()
    finally:
        for quantizer in quantizers:
            quantizer.batch_share = 1.0
    return loss


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    pool: Trajectories,
    conditional: bool,
    layers: list[str],
    cfg: FinetuneSpec,
    checkpoint_dir: Path,
    on_log: Callable[[int, float, float], None] | None = None,
    log_every: int = 10,
    *,
    targets: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> DistillResult:
    """Fine-tune ``student`` against ``teacher`` on pool inputs; resumes from ``checkpoint_dir``.

    Args:
        student: Fake-quantized denoiser (modified in place; adapters merged at the end).
        teacher: FP denoiser (None when ``targets`` are given).
        pool: Teacher trajectories (inputs only; targets come from the teacher).
        conditional: Pass class labels.
        layers: Trainable layers (see :func:`select_layers`).
        cfg: Hyper-parameters (the spec's ``finetune`` section; ``trainable`` is applied by the caller).
        checkpoint_dir: Checkpoints every ``cfg.checkpoint_every`` steps; a previous run's latest
            checkpoint there is resumed. The teacher's predictions are written there too.
        on_log: ``(step, loss, lr)`` every ``log_every`` steps and at the last (e.g. MLflow).
        log_every: Steps between ``on_log`` calls.
        targets: The teacher's predictions on ``pool`` (:func:`teacher_targets`), computed before
            (so the teacher can leave the device first); None computes them from ``teacher``.
        batch_size: Most inputs per forward: the teacher's pass and the student's micro-batches
            (None: the whole ``cfg.batch_size`` at once, 256 for the teacher).

    Raises:
        DataError: If the loss becomes non-finite.
        ValueError: Neither a teacher nor its targets.
    """
    from diffquant.progress import track

    groups = prepare_student(student, layers, cfg)
    scales = [p for g in groups[1:] for p in g["params"]]
    optimizer = torch.optim.Adam(groups)
    start = load_checkpoint(checkpoint_dir, student, optimizer)
    result = DistillResult(cfg.steps, start, 0.0, sum(p.numel() for g in groups for p in g["params"]), layers)
    if targets is None:
        if teacher is None:
            raise ValueError("distill needs the teacher or its targets")
        # the teacher's predictions on the pool are fixed: compute them once (one batched no-grad pass)
        targets = teacher_targets(teacher, pool, conditional, batch_size or 256, Path(checkpoint_dir) / TARGETS)
    student.train()
    began = time.perf_counter()
    with track("Fine-tuning", cfg.steps) as bar:
        bar.advance(start)
        for step in range(start, cfg.steps):
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(len(pool), (min(cfg.batch_size, len(pool)),), generator=generator)
            factor = _lr_factor(step, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(student, pool, targets, idx, conditional, batch_size, step)
            optimizer.step()
            with torch.no_grad():  # a learned step size must stay a valid (positive) scale
                for scale in scales:
                    scale.clamp_(min=SCALE_EPS)
            value = float(loss.detach())
            result.first_loss = value if result.first_loss is None else result.first_loss
            result.last_loss = value
            result.losses.append((step, value))
            if on_log is not None and (step % log_every == 0 or step == cfg.steps - 1):
                on_log(step, value, optimizer.param_groups[0]["lr"])
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(checkpoint_dir, step + 1, student, optimizer)
            bar.advance()
    student.eval()
    finalize_student(student)
    result.seconds = time.perf_counter() - began
    return result
