"""Training of the bundled reference models (digits-unet and its evaluation classifier).

Both are trained on the fixed train split of :mod:`diffquant.data` with fixed seeds, so
``diffquant train-reference`` reproduces the shipped weights on this kind of CPU.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from diffquant.data import DigitsSplit
from diffquant.models.classifier import DigitClassifier
from diffquant.models.reference import NULL_CLASS, SCHEDULER_CONFIG, build_digits_unet
from diffquant.progress import track

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UNetTrainConfig:
    """Hyper-parameters of the digits-unet training run."""

    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    cond_drop: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Hyper-parameters of the classifier training run."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift images by up to one pixel (the classifier must tolerate imperfect samples)."""
    shifts = torch.randint(-1, 2, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=shifts, dims=(2, 3))


def train_classifier(data: DigitsSplit, config: ClassifierTrainConfig) -> tuple[DigitClassifier, float]:
    """Train the evaluation classifier.

    Args:
        data: The digits split.
        config: Training hyper-parameters.

    Returns:
        The classifier (eval mode) and its held-out accuracy.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    n = data.train_images.shape[0]
    with track("Training classifier", config.epochs) as bar:
        for _ in range(config.epochs):
            model.train()
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                images = _augment(data.train_images[idx], generator)
                loss = F.cross_entropy(model(images), data.train_labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            bar.advance()
    model.eval()
    with torch.no_grad():
        predictions = model(data.held_out_images).argmax(1)
    accuracy = (predictions == data.held_out_labels).float().mean().item()
    logger.info("classifier held-out accuracy %.4f", accuracy)
    return model, accuracy


def _class_condition(cond_drop: float) -> Condition:
    def condition(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        labels = labels.clone()
        labels[torch.rand(labels.shape[0], generator=generator) < cond_drop] = NULL_CLASS
        return labels

    return condition


def train_digits_unet(data: DigitsSplit, config: UNetTrainConfig):
    """Train the class-conditional digits-unet with epsilon prediction and an EMA copy.

    Classes are dropped to the null class ``NULL_CLASS`` with probability ``cond_drop`` so the
    model also learns the unconditional score.

    Args:
        data: The digits split (only the train half is used).
        config: Training hyper-parameters.

    Returns:
        A tuple of the EMA model (eval mode) and the list of per-step losses.
    """
    torch.manual_seed(config.seed)
    return train_denoiser(build_digits_unet(), data, config, _class_condition(config.cond_drop), "digits-unet")


Condition = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""Maps a batch of digit labels to the denoiser's condition (may drop some to the null one)."""


def train_denoiser(model: torch.nn.Module, data: DigitsSplit, config: UNetTrainConfig, condition: Condition, name: str):
    """Train a denoiser ``model(x_t, t, condition).sample`` with epsilon prediction and an EMA copy.

    The shared loop of every reference model: seeded batches from the train split, uniform
    timesteps of the cosine schedule, AdamW with a one-cycle learning rate, gradient clip 1.0.

    Args:
        model: The untrained denoiser (parameters initialised by the caller under its seed).
        data: The digits split (only the train half is used).
        config: Training hyper-parameters (``cond_drop`` is applied by ``condition``).
        condition: Builds each batch's condition from its labels.
        name: Model name for the progress bar and logs.

    Returns:
        A tuple of the EMA model (eval mode) and the list of per-step losses.
    """
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(config.seed)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas = scheduler.alphas_cumprod
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps)
    n = data.train_images.shape[0]
    losses: list[float] = []
    model.train()
    with track(f"Training {name}", config.steps) as bar:
        for step in range(config.steps):
            idx = torch.randint(0, n, (config.batch_size,), generator=generator)
            x0 = data.train_images[idx]
            cond = condition(data.train_labels[idx], generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            loss = F.mse_loss(model(xt, t, cond).sample, noise)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            sched.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - decay)
            losses.append(loss.item())
            if step % 500 == 0 or step == config.steps - 1:
                logger.info("%s step %d loss %.4f", name, step, loss.item())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training diverged at step {step}")
            bar.advance()
    return ema, losses


MODEL_CARD = """# {name}

Reproduce: `diffquant train-reference` (writes into the package; `--out DIR` elsewhere).
Training takes about {minutes:.0f} minutes on a 2-core CPU (measured {seconds:.0f} s for both models).

## Data and split
scikit-learn's bundled digits (1,797 8x8 grey images, pixel values 0-16 mapped to [-1, 1]).
Stratified split with `random_state={split_seed}`: {train} training images, {held_out} held out
(never trained on; used as the "real" set for Frechet distance).

## {body}
"""

UNET_BODY = """digits-unet (diffusers UNet2DModel, {params:,} parameters, safetensors)
Config: `config.json` (block_out_channels (32, 64, 64), self-attention in the middle down/up
blocks, 11 class embeddings = 10 digits + null class {null}). Scheduler: `scheduler_config.json`
(1,000 steps, cosine "squaredcos_cap_v2" betas, epsilon prediction).

Training: seed {seed}, {steps} steps, batch {batch}, AdamW lr {lr} with one-cycle schedule,
weight decay {wd}, class dropped to the null class with p={drop}, gradient clip 1.0, EMA decay
{ema} (the EMA weights are shipped). Final training loss (mean of last 100 steps): {loss:.4f}.

Metrics (DDIM {sample_steps} steps, eta 0, guidance 1.0, {samples} samples = {per_class} per class,
noise seed 0; FD on the evaluation classifier's 64-d features, a project-specific FD, comparable
only at the same sample count):
- condition accuracy: {accuracy:.4f}
- FD to held-out real digits: {fd_real:.3f}
- second noise seed (1), the noise floor: accuracy {accuracy_2:.4f}, FD to real {fd_real_2:.3f}
- for scale, real vs real: FD of the {train} training digits to the {held_out} held-out digits
  is {fd_train_vs_held_out:.3f} (the features have mean norm of about {feature_norm:.0f}, so this
  FD is not on the scale of Inception FIDs)
"""

CLASSIFIER_BODY = """digits-classifier (two-conv CNN, {params:,} parameters, safetensors)
Conv(1->32) ReLU Conv(32->64) ReLU MaxPool Linear(1024->64) ReLU [features] Linear(64->10).
Training: seed {seed}, {epochs} epochs, batch {batch}, Adam lr {lr}, random one-pixel shifts.
Held-out accuracy: {accuracy:.4f}.
"""


def write_reference_models(
    out_dir: Path,
    unet_config: UNetTrainConfig | None = None,
    classifier_config: ClassifierTrainConfig | None = None,
    eval_samples: int = 2000,
    eval_steps: int = 50,
) -> dict[str, float]:
    """Train both reference models and write them with configs and model cards.

    Writes ``<out_dir>/digits-unet/`` (diffusers ``save_pretrained`` layout plus
    ``scheduler_config.json``, ``diffquant.json`` and ``MODEL_CARD.md``) and
    ``<out_dir>/digits-classifier/``.

    Args:
        out_dir: Parent folder of the two model folders.
        unet_config: digits-unet hyper-parameters (defaults reproduce the shipped weights).
        classifier_config: Classifier hyper-parameters.
        eval_samples: Samples for the metrics in the model card.
        eval_steps: DDIM steps for those metrics.

    Returns:
        The measured metrics.
    """
    import time

    from diffquant.data import load_digits_split

    unet_config = unet_config or UNetTrainConfig()
    classifier_config = classifier_config or ClassifierTrainConfig()
    start = time.perf_counter()
    data = load_digits_split()
    classifier, clf_accuracy = train_classifier(data, classifier_config)
    ema, losses = train_digits_unet(data, unet_config)
    seconds = time.perf_counter() - start
    return package_reference_models(
        out_dir,
        classifier,
        clf_accuracy,
        ema,
        losses,
        seconds,
        unet_config,
        classifier_config,
        eval_samples,
        eval_steps,
    )


def package_reference_models(
    out_dir: Path,
    classifier: DigitClassifier,
    clf_accuracy: float,
    ema: torch.nn.Module,
    losses: list[float],
    seconds: float,
    unet_config: UNetTrainConfig,
    classifier_config: ClassifierTrainConfig,
    eval_samples: int = 2000,
    eval_steps: int = 50,
) -> dict[str, float]:
    """Save trained reference models with configs, evaluate them and write model cards.

    Args:
        out_dir: Parent folder of the two model folders.
        classifier: The trained classifier.
        clf_accuracy: Its held-out accuracy.
        ema: The trained digits-unet (EMA weights).
        losses: Per-step training losses.
        seconds: Training wall time of both models.
        unet_config: The digits-unet hyper-parameters used.
        classifier_config: The classifier hyper-parameters used.
        eval_samples: Samples for the metrics in the model card.
        eval_steps: DDIM steps for those metrics.

    Returns:
        The measured metrics.
    """
    import json

    from diffquant.data import SPLIT_SEED, load_digits_split
    from diffquant.evaluation import evaluate_model
    from diffquant.metrics import frechet_distance
    from diffquant.models.loading import load_local_model
    from diffquant.models.reference import DIGITS_CLASSIFIER, DIGITS_UNET
    from diffquant.storage import save_safetensors, write_json, write_text

    out_dir = Path(out_dir)
    data = load_digits_split()
    clf_dir = out_dir / DIGITS_CLASSIFIER
    save_safetensors(classifier.state_dict(), clf_dir / "model.safetensors")
    write_json(
        {
            "num_classes": 10,
            "feature_dim": classifier.head.in_features,
            "train": classifier_config.__dict__,
            "held_out_accuracy": clf_accuracy,
        },
        clf_dir / "config.json",
    )
    unet_dir = out_dir / DIGITS_UNET
    ema.save_pretrained(str(unet_dir), safe_serialization=True)
    (unet_dir / "diffusion_pytorch_model.safetensors").chmod(0o644)
    write_json(SCHEDULER_CONFIG | {"_class_name": "DDPMScheduler"}, unet_dir / "scheduler_config.json")
    write_json({"name": DIGITS_UNET, "num_classes": 10, "null_class": NULL_CLASS}, unet_dir / "diffquant.json")

    model = load_local_model(unet_dir, name=DIGITS_UNET)
    metrics = {
        "classifier_accuracy": clf_accuracy,
        "train_seconds": seconds,
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
    }
    metrics["fd_train_vs_held_out"] = frechet_distance(classifier, data.train_images, data.held_out_images)
    with torch.no_grad():
        metrics["feature_norm"] = float(classifier.features(data.held_out_images).norm(dim=1).mean())
    for seed, suffix in ((0, ""), (1, "_2")):
        result = evaluate_model(
            model,
            eval_samples,
            eval_steps,
            seed,
            1000,
            classifier,
            data.held_out_images,
            description=f"Evaluating digits-unet (seed {seed})",
        )
        metrics[f"accuracy{suffix}"] = result.metrics["accuracy"]
        metrics[f"fd_real{suffix}"] = result.metrics["fd_real"]
    common: dict[str, Any] = {
        "minutes": seconds / 60,
        "seconds": seconds,
        "split_seed": SPLIT_SEED,
        "train": data.train_images.shape[0],
        "held_out": data.held_out_images.shape[0],
    }
    unet_body = UNET_BODY.format(
        params=sum(p.numel() for p in ema.parameters()),
        null=NULL_CLASS,
        seed=unet_config.seed,
        steps=unet_config.steps,
        batch=unet_config.batch_size,
        lr=unet_config.lr,
        wd=unet_config.weight_decay,
        drop=unet_config.cond_drop,
        ema=unet_config.ema_decay,
        loss=metrics["final_loss"],
        sample_steps=eval_steps,
        samples=eval_samples,
        per_class=eval_samples // 10,
        **metrics,
        **common,
    )
    clf_body = CLASSIFIER_BODY.format(
        params=sum(p.numel() for p in classifier.parameters()),
        seed=classifier_config.seed,
        epochs=classifier_config.epochs,
        batch=classifier_config.batch_size,
        lr=classifier_config.lr,
        accuracy=clf_accuracy,
    )
    write_text(MODEL_CARD.format(name=DIGITS_UNET, body=unet_body, **common), unet_dir / "MODEL_CARD.md")
    write_text(MODEL_CARD.format(name=DIGITS_CLASSIFIER, body=clf_body, **common), clf_dir / "MODEL_CARD.md")
    write_json(metrics, unet_dir / "metrics.json")
    logger.info("reference models written to %s: %s", out_dir, json.dumps(metrics))
    return metrics
