"""Training and packaging of the transformer and text-to-image reference models.

``digits-dit`` (a class-conditional ``DiTTransformer2DModel``) and ``digits-t2i`` (a
``UNet2DConditionModel`` with cross-attention, conditioned by a ``CLIPTextModel`` trained from
scratch with it on phrasings that name the digit) are trained with the same loop as
``digits-unet`` (:func:`diffquant.training.train_denoiser`) and judged by the same bundled
classifier. ``digits-t2i``'s content metric is condition accuracy on phrasings held out of
training (:data:`diffquant.models.prompts.HELD_OUT_TEMPLATES`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from diffquant.data import SPLIT_SEED, DigitsSplit, load_digits_split
from diffquant.models.prompts import (
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    build_word_tokenizer,
    digit_prompts,
    hf_tokenize,
)
from diffquant.models.reference import (
    DIGITS_DIT,
    DIGITS_DIT_CONFIG,
    DIGITS_T2I,
    DIGITS_T2I_TEXT_CONFIG,
    DIGITS_T2I_UNET_CONFIG,
    NULL_CLASS,
    SCHEDULER_CONFIG,
    T2I_MAX_TOKENS,
    build_digits_dit,
    build_digits_t2i,
    load_classifier,
)
from diffquant.training.reference import UNetTrainConfig, train_denoiser

logger = logging.getLogger(__name__)

DIT_TRAIN = UNetTrainConfig(steps=2000, lr=1e-3, cond_drop=0.1)
"""Shipped digits-dit run (the DiT drops labels itself: AdaLN label embedding, p = 0.1)."""

T2I_TRAIN = UNetTrainConfig(steps=2000, lr=2e-3, cond_drop=0.1)
"""Shipped digits-t2i run (prompts dropped to the empty prompt with p = ``cond_drop``)."""


@dataclass(frozen=True)
class CardFacts:
    """What every model card states about training and evaluation."""

    name: str
    description: str
    params: int
    config: UNetTrainConfig
    seconds: float
    final_loss: float


def train_digits_dit(data: DigitsSplit, config: UNetTrainConfig = DIT_TRAIN) -> tuple[torch.nn.Module, list[float]]:
    """Train ``digits-dit`` (class labels; the model's label embedding drops them to the null class).

    Returns:
        The EMA model and the per-step losses.
    """
    torch.manual_seed(config.seed)
    model = build_digits_dit()
    return train_denoiser(model, data, config, lambda labels, generator: labels, DIGITS_DIT)


def t2i_tokenizer():
    """The word-level tokenizer of ``digits-t2i`` (vocabulary of the training phrasings only)."""
    return build_word_tokenizer([p.text for p in digit_prompts(TRAIN_TEMPLATES)], T2I_MAX_TOKENS)


def train_digits_t2i(
    data: DigitsSplit, config: UNetTrainConfig = T2I_TRAIN
) -> tuple[Any, torch.nn.Module, list[float]]:
    """Train ``digits-t2i``: text encoder and U-Net together on random training phrasings.

    Each training image gets a random template naming its digit; with probability
    ``config.cond_drop`` the prompt is empty instead (the unconditional score).

    Returns:
        The tokenizer, the EMA model (a ``TextConditionedUNet``) and the per-step losses.
    """
    tokenizer = t2i_tokenizer()
    encode = hf_tokenize(tokenizer)
    prompt_ids = encode([p.text for p in digit_prompts(TRAIN_TEMPLATES)])
    null_ids = encode([""])[0]
    templates = len(TRAIN_TEMPLATES)

    def condition(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        template = torch.randint(0, templates, labels.shape, generator=generator)
        ids = prompt_ids[template * 10 + labels].clone()
        ids[torch.rand(labels.shape[0], generator=generator) < config.cond_drop] = null_ids
        return ids

    torch.manual_seed(config.seed)
    model = build_digits_t2i(len(tokenizer))
    ema, losses = train_denoiser(model, data, config, condition, DIGITS_T2I)
    return tokenizer, ema, losses


def _prompt_rows(templates: tuple[str, ...]) -> list[list[Any]]:
    return [[p.text, p.label] for p in digit_prompts(templates)]


def _evaluate(model_dir: Path, name: str, eval_samples: int, eval_steps: int) -> dict[str, float]:
    from diffquant.evaluation import evaluate_model
    from diffquant.models.loading import load_local_model

    data = load_digits_split()
    classifier = load_classifier()
    model = load_local_model(model_dir, name=name)
    metrics: dict[str, float] = {}
    for seed, suffix in ((0, ""), (1, "_2")):
        result = evaluate_model(
            model,
            eval_samples,
            eval_steps,
            seed,
            1000,
            classifier,
            data.held_out_images,
            description=f"Evaluating {name} (seed {seed})",
        )
        metrics[f"accuracy{suffix}"] = result.metrics["accuracy"]
        metrics[f"fd_real{suffix}"] = result.metrics["fd_real"]
    if model.prompts is not None:
        trained = load_local_model(model_dir, name=name)
        assert trained.prompts is not None
        trained.prompts.evaluation = trained.prompts.calibration
        result = evaluate_model(
            trained,
            eval_samples,
            eval_steps,
            0,
            1000,
            classifier,
            data.held_out_images,
            description=f"Evaluating {name} (training phrasings)",
        )
        metrics["accuracy_train_phrasings"] = result.metrics["accuracy"]
    return metrics


CARD = """# {name}

{description}

Reproduce: `diffquant train-reference --model {name}` (writes into the package; `--out DIR`
elsewhere). Measured training time on this 2-core CPU: {seconds:.0f} s.

Data: scikit-learn's bundled digits, the same stratified split as digits-unet (`random_state={split_seed}`),
{train} training images; the {held_out} held-out images are the "real" set for Frechet distance.

Training: seed {seed}, {steps} steps, batch {batch}, AdamW lr {lr} one-cycle, weight decay {wd},
condition dropped with p={drop}, gradient clip 1.0, EMA decay {ema} (EMA weights shipped), epsilon
prediction on the cosine ("squaredcos_cap_v2") 1,000-step schedule. Final training loss (mean of
the last 100 steps): {final_loss:.4f}. Parameters: {params:,}.

Metrics (DDIM {sample_steps} steps, eta 0, guidance 1.0, {samples} samples, noise seed 0; FD on the
digits classifier's features, comparable only at the same sample count):
{metric_lines}
"""


def _write_card(out: Path, facts: CardFacts, metrics: dict[str, float], eval_samples: int, eval_steps: int) -> None:
    from diffquant.storage import write_json, write_text

    data = load_digits_split()
    lines = "\n".join(f"- {key}: {value:.4f}" for key, value in metrics.items())
    cfg = facts.config
    text = CARD.format(
        name=facts.name,
        description=facts.description,
        seconds=facts.seconds,
        split_seed=SPLIT_SEED,
        train=data.train_images.shape[0],
        held_out=data.held_out_images.shape[0],
        seed=cfg.seed,
        steps=cfg.steps,
        batch=cfg.batch_size,
        lr=cfg.lr,
        wd=cfg.weight_decay,
        drop=cfg.cond_drop,
        ema=cfg.ema_decay,
        final_loss=facts.final_loss,
        params=facts.params,
        sample_steps=eval_steps,
        samples=eval_samples,
        metric_lines=lines,
    )
    write_text(text, out / "MODEL_CARD.md")
    write_json(
        {**metrics, "train_seconds": facts.seconds, "final_loss": facts.final_loss, "train": asdict(cfg)},
        out / "metrics.json",
    )


def write_digits_dit(
    out_dir: Path, config: UNetTrainConfig = DIT_TRAIN, eval_samples: int = 2000, eval_steps: int = 50
) -> dict[str, float]:
    """Train ``digits-dit`` and write it (bare diffusers model folder) with its card and metrics.

    Returns:
        The measured metrics.
    """
    from diffquant.storage import write_json

    start = time.perf_counter()
    ema, losses = train_digits_dit(load_digits_split(), config)
    seconds = time.perf_counter() - start
    out = Path(out_dir) / DIGITS_DIT
    ema.save_pretrained(str(out), safe_serialization=True)
    write_json(SCHEDULER_CONFIG | {"_class_name": "DDPMScheduler"}, out / "scheduler_config.json")
    write_json({"name": DIGITS_DIT, "num_classes": 10, "null_class": NULL_CLASS}, out / "diffquant.json")
    metrics = _evaluate(out, DIGITS_DIT, eval_samples, eval_steps)
    description = (
        f"Class-conditional diffusion transformer (diffusers DiTTransformer2DModel, AdaLN-Zero): "
        f"{json.dumps(DIGITS_DIT_CONFIG)}. Linear-heavy: every block has its own timestep embedder, "
        "AdaLN modulation, attention and MLP projections."
    )
    facts = CardFacts(DIGITS_DIT, description, _params(ema), config, seconds, _tail(losses))
    _write_card(out, facts, metrics, eval_samples, eval_steps)
    return {**metrics, "train_seconds": seconds}


def write_digits_t2i(
    out_dir: Path, config: UNetTrainConfig = T2I_TRAIN, eval_samples: int = 2000, eval_steps: int = 50
) -> dict[str, float]:
    """Train ``digits-t2i`` and write it as a diffusers-style pipeline folder with card and metrics.

    The folder holds ``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/`` and ``diffquant.json`` (the calibration and held-out evaluation prompts).

    Returns:
        The measured metrics.
    """
    from diffquant.storage import write_json

    start = time.perf_counter()
    tokenizer, ema, losses = train_digits_t2i(load_digits_split(), config)
    seconds = time.perf_counter() - start
    out = Path(out_dir) / DIGITS_T2I
    ema.unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    ema.text_encoder.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    write_json(SCHEDULER_CONFIG | {"_class_name": "DDPMScheduler"}, out / "scheduler" / "scheduler_config.json")
    write_json(
        {
            "_class_name": "DiffquantTextToImagePipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "scheduler": ["diffusers", "DDPMScheduler"],
        },
        out / "model_index.json",
    )
    write_json(
        {
            "name": DIGITS_T2I,
            "num_classes": 10,
            "prompts": {"calibration": _prompt_rows(TRAIN_TEMPLATES), "evaluation": _prompt_rows(HELD_OUT_TEMPLATES)},
        },
        out / "diffquant.json",
    )
    metrics = _evaluate(out, DIGITS_T2I, eval_samples, eval_steps)
    description = (
        "Text-conditioned U-Net (diffusers UNet2DConditionModel with cross-attention, "
        f"{json.dumps(DIGITS_T2I_UNET_CONFIG)}) conditioned by a CLIPTextModel trained from scratch with it "
        f"({json.dumps(DIGITS_T2I_TEXT_CONFIG)}, {len(tokenizer)}-word vocabulary, {T2I_MAX_TOKENS} tokens). "
        f"Training phrasings: {'; '.join(TRAIN_TEMPLATES)}. Held out (evaluation): "
        f"{'; '.join(HELD_OUT_TEMPLATES)}. `accuracy` is condition accuracy on the held-out phrasings; "
        "`accuracy_train_phrasings` on the training ones."
    )
    facts = CardFacts(DIGITS_T2I, description, _params(ema), config, seconds, _tail(losses))
    _write_card(out, facts, metrics, eval_samples, eval_steps)
    return {**metrics, "train_seconds": seconds}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tail(losses: list[float]) -> float:
    return sum(losses[-100:]) / len(losses[-100:])
