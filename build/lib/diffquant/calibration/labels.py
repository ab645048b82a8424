"""Class labels for calibration sampling, read from a user file."""

from __future__ import annotations

from pathlib import Path

import torch

from diffquant.errors import DataError


def read_labels_file(path: Path, num_classes: int | None, condition: str | None = "class") -> torch.Tensor:
    """Read class labels (one integer per line, ``#`` comments allowed) for calibration sampling.

    Args:
        path: The labels file.
        num_classes: The model's number of classes (None: unconditional).
        condition: The model's condition kind; labels files are for ``class`` models only.

    Raises:
        DataError: If the file is missing, unreadable, empty, holds labels out of range, or the
            model is text-conditioned (which takes ``model.prompts`` instead).
    """
    path = Path(path)
    if condition == "text":
        raise DataError(
            f"labels file {path} given, but the model is text-conditioned; set model.prompts to a prompts file"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"labels file {path} cannot be read: {getattr(error, 'strerror', None) or error}") from None
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"labels file {path} is empty; put one class label per line")
    try:
        labels = torch.tensor([int(line) for line in lines])
    except ValueError:
        raise DataError(f"labels file {path} must hold one integer class label per line") from None
    if num_classes is None:
        raise DataError(f"labels file {path} given, but the model is unconditional")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise DataError(f"labels file {path} has label {int(bad[0])} outside 0..{num_classes - 1}")
    return labels
