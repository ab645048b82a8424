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


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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
        f"- weights: {summary['sizes']['fp32_bytes']:,} B fp32 -> {summary['sizes']['packed_bytes']:,} B packed "
        f"({summary['sizes']['ratio']:.3f}x)",
        "",
        "| metric | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics[s].get(name, "")) for s in metrics) + " |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {sec:.1f} |" for stage, sec in summary["timings"].items()]
    lines += ["", f"Export: {summary['export']['status']} ({summary['export']['reason']})", ""]
    return "\n".join(lines)


def write_report(summary: dict[str, Any], path: Path) -> Path:
    """Write :func:`render_report` output to ``path``."""
    return write_text(render_report(summary), path)
