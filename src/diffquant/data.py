"""The scikit-learn digits data set with the project's fixed train / held-out split.

The 1,797 8x8 digits ship inside scikit-learn, so nothing is downloaded. Pixel values 0..16 are
mapped to [-1, 1], the range the diffusion models are trained and sampled in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPLIT_SEED = 0
HELD_OUT_SIZE = 300


@dataclass(frozen=True)
class DigitsSplit:
    """Images in [-1, 1] with shape (N, 1, 8, 8) and integer labels, for both halves."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    held_out_images: torch.Tensor
    held_out_labels: torch.Tensor


def load_digits_split(seed: int = SPLIT_SEED, held_out: int = HELD_OUT_SIZE) -> DigitsSplit:
    """Load the digits and split them, stratified by class, with a fixed seed.

    Args:
        seed: Seed of the stratified split; the project's models use ``SPLIT_SEED``.
        held_out: Number of held-out images (never seen in training).

    Returns:
        The split as float32 image tensors in [-1, 1] and int64 labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    labels = digits.target.astype(np.int64)
    x_tr, x_ho, y_tr, y_ho = train_test_split(images, labels, test_size=held_out, stratify=labels, random_state=seed)
    return DigitsSplit(
        train_images=torch.from_numpy(x_tr).unsqueeze(1),
        train_labels=torch.from_numpy(y_tr),
        held_out_images=torch.from_numpy(x_ho).unsqueeze(1),
        held_out_labels=torch.from_numpy(y_ho),
    )
