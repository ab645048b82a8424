"""Human-readable run outputs: sample grids (PNG) and the markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffquant.storage import atomic_path, write_text


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W) or (N, H, W, C)."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)


def comparison_grid(
    left: torch.Tensor, right: torch.Tensor, path: Path, per_row: int = 10, rows: int = 4, upscale: int = 6
) -> Path:
    """Save a PNG of ``left`` (FP) and ``right`` (quantized) sample grids side by side.

    Args:
        left: FP samples (N, C, H, W) in [-1, 1].
        right: Quantized samples from the same noise.
        path: Output PNG path.
        per_row: Samples per row (one row per noise seed block, classes along the row).
        rows: Rows shown.
        upscale: Nearest-neighbour upscale factor per pixel.
    """
    from PIL import Image

    count = min(per_row * rows, left.shape[0])

    def grid(images: torch.Tensor) -> np.ndarray:
        tiles = to_uint8(images[:count])
        h, w = tiles.shape[1:3]
        canvas = np.full((rows * (h + 1) + 1, per_row * (w + 1) + 1, *tiles.shape[3:]), 255, np.uint8)
        for i, tile in enumerate(tiles):
            r, c = divmod(i, per_row)
            canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = tile
        return canvas

    a, b = grid(left), grid(right)
    gap = np.full((a.shape[0], 3, *a.shape[2:]), 128, np.uint8)
    image = Image.fromarray(np.concatenate([a, gap, b], axis=1))
    image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


QUALITY_WITHOUT_CLASSIFIER = (
    "quality is measured against the full-precision model (PSNR/SSIM of samples from the same noise, "
    "SQNR of denoiser outputs); accuracy and FD are not computed"
)


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
    return [f"{why}: {QUALITY_WITHOUT_CLASSIFIER}"]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _sizes_line(sizes: dict[str, Any]) -> str:
    """Float, plan (packed) and deployed (the device class's storage types) weight bytes."""
    line = f"- weights: {sizes['fp32_bytes']:,} B fp32 -> {sizes['packed_bytes']:,} B packed by the plan ({sizes['ratio']:.3f}x)"
    if sizes.get("deployed_bytes") is not None:
        line += f", {sizes['deployed_bytes']:,} B deployed (the export's storage types and zero points)"
    if sizes.get("onnx_weight_bytes") is not None:
        line += f"; ONNX initializers {sizes['onnx_weight_bytes']:,} B"
    return line


def render_report(summary: dict[str, Any]) -> str:
    """Markdown report of a compress run from its summary dict."""
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
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {sec:.1f} |" for stage, sec in summary["timings"].items()]
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
