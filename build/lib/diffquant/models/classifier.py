"""The evaluation classifier: a small two-conv CNN over 8x8 digits.

Its penultimate activations are the feature space for Frechet distance (a project-specific
"FD", not the Inception-based FID), and its argmax is the condition-accuracy judge.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """Two conv layers, a 64-d feature layer and a 10-way head; input (N, 1, 8, 8) in [-1, 1]."""

    def __init__(self, num_classes: int = 10, feature_dim: int = FEATURE_DIM) -> None:
        """Build the network.

        Args:
            num_classes: Number of output classes.
            feature_dim: Width of the feature layer used for Frechet distance.
        """
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the (N, feature_dim) feature vectors of images ``x``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for images ``x``."""
        return self.head(self.body(x))


class ClassifierFeatures(nn.Module):
    """Adapter that exposes the classifier's features to torchmetrics' Frechet distance."""

    def __init__(self, classifier: DigitClassifier) -> None:
        """Wrap ``classifier``; ``num_features`` tells torchmetrics the feature width."""
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.head.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return float features for images in [-1, 1]."""
        return self.classifier.features(x.float())
