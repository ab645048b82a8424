"""Human-readable run outputs: sample grids (PNG) and the markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffquant.storage import atomic_path, write_text


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (or already ``uint8``), (N, C, H, W) -> uint8 (N, H, W) or (N, H, W, C)."""
    if images.dtype == torch.uint8:
        array = images.numpy()
    else:
        array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)


GRID_TITLES = ("full precision", "quantized")
TITLE_HEIGHT = 16
"""Pixels of the title strip above the two grids."""


def grid_layout(height: int, width: int, per_row: int = 10, rows: int = 4) -> tuple[int, int, int]:
    """Samples per row, rows and upscale factor for tiles of ``height`` x ``width`` pixels.

    Small tiles (8x8 digits) are shown 10 x 4, each pixel upscaled to about 48 pixels a tile; large
    ones (decoded 512x512 images) at their own size, as many as fit about 1024 pixels per grid side.
    """
    upscale = max(1, round(48 / max(height, width)))
    per_row = max(1, min(per_row, 1024 // (width * upscale) or 1))
    rows = max(1, min(rows, 1024 // (height * upscale) or 1))
    return per_row, rows, upscale


def comparison_grid(
    left: torch.Tensor,
    right: torch.Tensor,
    path: Path,
    titles: tuple[str, str] = GRID_TITLES,
    per_row: int = 10,
    rows: int = 4,
) -> Path:
    """Save a PNG of ``left`` (FP) and ``right`` (quantized) sample grids side by side, each titled.

    Args:
        left: FP samples (N, C, H, W) in [-1, 1], or ``uint8`` images (decoded latents).
        right: Quantized samples from the same noise, in the same form.
        path: Output PNG path.
        titles: The two grids' titles (drawn above them).
        per_row: Most samples per row (fewer for large images, see :func:`grid_layout`).
        rows: Most rows (fewer when there are fewer samples).
    """
    from PIL import Image, ImageDraw, ImageFont

    per_row, rows, upscale = grid_layout(*left.shape[-2:], per_row, rows)
    count = min(per_row * rows, left.shape[0])
    rows = -(-count // per_row)  # no empty rows

    def grid(images: torch.Tensor) -> np.ndarray:
        tiles = to_uint8(images[:count])
        h, w = tiles.shape[1:3]
        canvas = np.full((rows * (h + 1) + 1, per_row * (w + 1) + 1, *tiles.shape[3:]), 255, np.uint8)
        for i, tile in enumerate(tiles):
            r, c = divmod(i, per_row)
            canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = tile
        return canvas.repeat(upscale, axis=0).repeat(upscale, axis=1)

    a, b = grid(left), grid(right)
    gap = np.full((a.shape[0], 3 * upscale, *a.shape[2:]), 128, np.uint8)
    body = np.concatenate([a, gap, b], axis=1)
    image = Image.new(Image.fromarray(body).mode, (body.shape[1], body.shape[0] + TITLE_HEIGHT), "white")
    image.paste(Image.fromarray(body), (0, TITLE_HEIGHT))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for x, title in ((2, titles[0]), (a.shape[1] + gap.shape[1] + 2, titles[1])):
        draw.text((x, 2), title, fill="black", font=font)
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


QUALITY_WITHOUT_CLASSIFIER = (
    "quality is measured against the full-precision model (PSNR/SSIM of samples from the same noise, "
    "SQNR of denoiser outputs); accuracy and FD are not computed"
)
QUALITY_DECODED = (
    "quality is measured against the full-precision model (PSNR/SSIM of the decoded images and of the latents "
    "from the same noise, SQNR of denoiser outputs); accuracy and FD are not computed"
)

_ON_SAMPLES = "the FP model's from the same noise"
METRICS_ON: dict[str, str] = {
    "accuracy": "samples, by the digits classifier: share assigned the requested class",
    "fd_real": "digits-classifier features of the samples vs held-out real digits (Frechet distance)",
    "fd_fp": f"digits-classifier features of the samples vs {_ON_SAMPLES} (Frechet distance)",
    "psnr_latent": f"latents vs {_ON_SAMPLES} (data range of the FP latents)",
    "ssim_latent": f"latents vs {_ON_SAMPLES} (data range of the FP latents)",
    "clip_score": "images vs their prompts: max(100 x mean cosine of CLIP embeddings, 0)",
    "sqnr_db": "denoiser outputs vs the FP model's on held-out pool inputs (dB)",
    "sampling_seconds": "wall time of sampling",
    "decoding_seconds": "wall time of decoding the latents with the VAE",
}
"""What each evaluation metric is computed on (``psnr``/``ssim`` depend on the model: :func:`evaluation_section`)."""


def quality_notes(model: dict[str, Any], metrics: dict[str, dict[str, float]]) -> list[str]:
    """Notes on what the quality metrics of a run can say; empty when the classifier judged the samples.

    The digits classifier judges only digits-shaped pixel samples (1x8x8) whose evaluation
    conditions name a digit; for any other model the run falls back to FD-free comparisons with
    the full-precision model, and the note says why.

    Args:
        model: The model's identity: ``family``, ``sample_shape``, ``latent``, ``condition``,
            ``num_classes`` (the load task's result holds them).
        metrics: Metrics per stage (``fp``, ``quantized``, ...).
    """
    if any("accuracy" in stage or "fd_real" in stage for stage in metrics.values()):
        return []
    shape = "x".join(str(d) for d in model.get("sample_shape") or ())
    kind = "latents" if model.get("latent") else "samples"
    digits_like = tuple(model.get("sample_shape") or ()) == (1, 8, 8) and not model.get("latent")
    if digits_like and (model.get("num_classes") == 10 or model.get("condition") == "text"):
        why = f"the evaluation conditions name no digit class (family {model.get('family')}, {kind} {shape})"
    else:
        why = f"no evaluation classifier fits this model (family {model.get('family')}, {kind} {shape})"
    return [f"{why}: {QUALITY_DECODED if model.get('decoded') else QUALITY_WITHOUT_CLASSIFIER}"]


def evaluation_section(model: dict[str, Any], metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """What a run's evaluation metrics were computed on, and which were not computed and why.

    Args:
        model: The model's identity (``latent``, ``decoded``, ``condition``; the load task's result).
        metrics: Metrics per stage (``fp``, ``quantized``, ...).

    Returns:
        ``images``: what the sample grid shows and ``psnr``/``ssim`` compare (``decoded``: a latent
        model's samples decoded by its VAE; ``latents``: a latent model without a VAE; ``pixels``);
        ``metrics``: each computed metric -> what it was computed on; ``not_computed``: metric ->
        why not.
    """
    images = "decoded" if model.get("decoded") else "latents" if model.get("latent") else "pixels"
    on = dict(METRICS_ON)
    if images == "decoded":
        on["psnr"] = on["ssim"] = f"8-bit images decoded by the VAE vs {_ON_SAMPLES} (data range 255)"
    else:
        on["psnr"] = on["ssim"] = f"samples vs {_ON_SAMPLES} (data range 2)"
    computed = {name for stage in metrics.values() for name in stage}
    not_computed: dict[str, str] = {}
    if not computed & {"accuracy", "fd_real"}:
        reason = "the digits classifier judges only 1x8x8 digit samples whose conditions name a digit"
        not_computed |= dict.fromkeys(("accuracy", "fd_real", "fd_fp"), reason)
    undecoded = "the pipeline has no vae/ folder, so samples were not decoded (latent-space PSNR/SSIM only)"
    if images == "latents":
        not_computed |= dict.fromkeys(("psnr", "ssim"), undecoded)
    if model.get("condition") == "text" and "clip_score" not in computed:
        unset = "evaluate.clip_model is not set (a local CLIP model folder)"
        not_computed["clip_score"] = undecoded if images == "latents" else unset
    return {
        "images": images,
        "metrics": {name: on.get(name, "") for name in sorted(computed)},
        "not_computed": not_computed,
    }


def _evaluation_lines(summary: dict[str, Any], grid_image: bool) -> list[str]:
    """The report's lines on the sample grid, what each metric compares and what was not computed."""
    lines: list[str] = []
    grid = (summary.get("samples") or {}).get("grid")
    section = summary.get("evaluation")
    if grid and grid_image:
        out = Path(summary["out_dir"])
        link = Path(grid).relative_to(out).as_posix() if Path(grid).is_relative_to(out) else grid
        shown = "decoded images" if section and section["images"] == "decoded" else "samples"
        lines += ["", f"![full precision (left) and quantized (right) {shown} from the same noise]({link})"]
    if section:
        lines += ["", "| metric | computed on |", "|---|---|"]
        lines += [f"| {name} | {text} |" for name, text in section["metrics"].items()]
        if section["not_computed"]:
            why: dict[str, list[str]] = {}
            for name, reason in section["not_computed"].items():
                why.setdefault(reason, []).append(name)
            lines += ["", "Not computed: " + "; ".join(f"{', '.join(n)} ({r})" for r, n in why.items()) + "."]
    return lines


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _mb(value: Any) -> str:
    return f"{value / 2**20:,.0f}" if isinstance(value, (int, float)) else ""


def stage_table(summary: dict[str, Any]) -> list[str]:
    """Markdown rows per stage: denoiser evaluations and the estimated against the measured seconds and peak memory."""
    estimate = (summary.get("estimate") or {}).get("stages", {})
    memory = summary.get("memory") or {}
    peak_key = "peak_cuda_bytes" if str((summary.get("estimate") or {}).get("device", "")).startswith("cuda") else None
    lines = [
        "| stage | denoiser evaluations | estimated s | measured s | estimated peak MB | measured peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for stage in dict.fromkeys([*estimate, *summary["timings"]]):
        est, used = estimate.get(stage, {}), memory.get(stage, {})
        measured = used.get(peak_key) if peak_key else used.get("peak_rss_bytes")
        seconds = summary["timings"].get(stage)
        lines.append(
            f"| {stage} | {est.get('evaluations', '')} | {_fmt(est['seconds']) if 'seconds' in est else ''} | "
            f"{f'{seconds:.1f}' if seconds is not None else ''} | {_mb(est.get('peak_bytes'))} | {_mb(measured)} |"
        )
    return lines


def _sizes_line(sizes: dict[str, Any]) -> str:
    """Float, plan (packed) and deployed (the device class's storage types) weight bytes."""
    line = f"- weights: {sizes['fp32_bytes']:,} B fp32 -> {sizes['packed_bytes']:,} B packed by the plan ({sizes['ratio']:.3f}x)"
    if sizes.get("deployed_bytes") is not None:
        line += f", {sizes['deployed_bytes']:,} B deployed (the export's storage types and zero points)"
    if sizes.get("onnx_weight_bytes") is not None:
        line += f"; ONNX initializers {sizes['onnx_weight_bytes']:,} B"
    return line


def render_report(summary: dict[str, Any], grid_image: bool = True) -> str:
    """Markdown report of a compress run from its summary dict.

    Args:
        summary: The run's summary (``summary.json``'s data).
        grid_image: Show the sample grid, linked relative to the run folder (``report.md`` sits
            there, and beside ``samples/`` among the MLflow run's artifacts).
    """
    metrics = summary["metrics"]
    names = sorted({k for stage in metrics.values() for k in stage})
    lines = [
        f"# diffquant compress: {summary['model']['name']}",
        "",
        f"- run id: `{summary.get('run_id')}`",
        f"- spec hash: `{summary['spec_hash']}`",
        f"- plan: {summary['plan']['quantized_layers']} of {summary['plan']['layers']} layers quantized "
        f"({summary['plan']['description']})",
        _sizes_line(summary["sizes"]),
        "",
        "| metric | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics[s].get(name, "")) for s in metrics) + " |")
    for note in summary.get("notes") or []:
        lines += ["", f"Note: {note}."]
    lines += _evaluation_lines(summary, grid_image)
    lines += ["", *stage_table(summary)]
    if summary.get("estimate"):
        est = summary["estimate"]
        lines += [
            "",
            f"Estimated before the stages ran ({est['device']}, {est['dtype']}): {est['evaluations']:,} denoiser "
            f"evaluations, {est['seconds']:.0f} s of stage work (start-up, MLflow logging and ONNX tracing are "
            "not in the estimate). Peak memory is the process's RSS on a CPU, torch's CUDA allocations on a GPU.",
        ]
    if summary.get("finetune"):
        ft = summary["finetune"]
        lines += [
            "",
            f"Fine-tuning: {ft['steps']} steps, {ft['trainable_parameters']:,} trainable parameters in "
            f"{ft['trainable_layers']} layers, {ft['seconds']:.0f} s; {ft['reason']}.",
        ]
    lines += ["", f"Export: {summary['export']['status']} ({summary['export']['reason']})", ""]
    reg = summary["model"]
    if reg.get("registered"):
        verdict = "passed its gates" if reg["promotion"]["passed"] else "did not pass its gates"
        lines += [
            f"Registry: `{reg['registered_name']}` version {reg['registered']} ({verdict}); "
            f"champion is now version {reg['champion']}.",
            "",
            *[f"- {reason}" for reason in reg["promotion"]["reasons"]],
            "",
        ]
    else:
        lines += [f"Registry: not registered ({reg.get('registered_reason')}).", ""]
    return "\n".join(lines)


def write_report(summary: dict[str, Any], path: Path) -> Path:
    """Write :func:`render_report` output to ``path``."""
    return write_text(render_report(summary), path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as PNG atomically and close it."""
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)
    return Path(path)


def timestep_histogram(pool_t: torch.Tensor, selected_t: torch.Tensor, path: Path, title: str) -> Path:
    """Save a bar chart of how many calibration samples each timestep got."""
    plt = _pyplot()

    values = torch.unique(pool_t)
    counts = [(selected_t == v).sum().item() for v in values]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(values.numpy(), counts, width=max(1.0, float(values.max() - values.min()) / max(len(values), 1) * 0.8))
    ax.set_xlabel("timestep t")
    ax.set_ylabel("selected samples")
    ax.set_title(title)
    return _save_figure(fig, path)


def pca_projection(features: torch.Tensor, selected: torch.Tensor, t: torch.Tensor, path: Path, title: str) -> Path:
    """Save a 2-D PCA scatter of pool features (colored by timestep) with the selected ones circled."""
    plt = _pyplot()

    flat = features.reshape(features.shape[0], -1).double()
    centered = flat - flat.mean(0)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    xy = (centered @ v[:2].T).numpy()
    fig, ax = plt.subplots(figsize=(5, 5))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=t.numpy(), s=4, cmap="viridis", alpha=0.4)
    sel = selected.numpy()
    ax.scatter(xy[sel, 0], xy[sel, 1], s=18, facecolors="none", edgecolors="red", linewidths=0.7, label="selected")
    fig.colorbar(points, ax=ax, label="timestep t")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.legend(loc="upper right")
    return _save_figure(fig, path)


def sensitivity_heatmap(rows: list[dict], path: Path) -> Path:
    """Save a heatmap of SQNR (dB) per layer (rows) and (kind, bits) option (columns)."""
    plt = _pyplot()

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    columns = list(dict.fromkeys((r["kind"], r["bits"]) for r in rows))
    grid = np.full((len(layers), len(columns)), np.nan)
    for r in rows:
        grid[layers.index(r["layer"]), columns.index((r["kind"], r["bits"]))] = min(float(r["sqnr_db"]), 80.0)
    fig, ax = plt.subplots(figsize=(2 + 0.6 * len(columns), 2 + 0.18 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(columns)), [f"{'W' if k == 'weight' else 'A'}{b}" for k, b in columns])
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    fig.colorbar(image, ax=ax, label="denoiser-output SQNR (dB), one layer quantized")
    return _save_figure(fig, path)


def pareto_plot(points: list[dict], path: Path) -> Path:
    """Two panels: packed bytes vs FD to real, and vs accuracy; mixed and uniform points."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in (
        (axes[0], "fd_real", "FD to real (lower is better)"),
        (axes[1], "accuracy", "condition accuracy (higher is better)"),
    ):
        for kind, marker in (("mixed", "o-"), ("uniform", "s--")):
            chosen = sorted(
                (p for p in points if p["kind"] == kind and p.get(metric) is not None), key=lambda p: p["packed_bytes"]
            )
            if chosen:
                ax.plot([p["packed_bytes"] / 1e6 for p in chosen], [p[metric] for p in chosen], marker, label=kind)
                for p in chosen:
                    ax.annotate(p["label"].split(" ", 1)[-1], (p["packed_bytes"] / 1e6, p[metric]), fontsize=7)
        ax.set_xlabel("packed weight bytes (MB)")
        ax.set_ylabel(label)
        ax.legend()
    return _save_figure(fig, path)
