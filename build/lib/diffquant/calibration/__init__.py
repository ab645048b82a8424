"""Calibration data.

The candidate pool (``pool``), selection strategies (``selection``), class labels from a file
(``labels``) and activation-range calibration (``ranges``).
"""

from diffquant.calibration.labels import read_labels_file
from diffquant.calibration.pool import POOL_CODE_VERSION, POOL_SEED_OFFSET, collect_pool, held_out_indices, subset
from diffquant.calibration.ranges import calibrate_activations
from diffquant.calibration.selection import STRATEGIES, SelectionParams, pool_features, select

__all__ = [
    "POOL_CODE_VERSION",
    "POOL_SEED_OFFSET",
    "STRATEGIES",
    "SelectionParams",
    "calibrate_activations",
    "collect_pool",
    "held_out_indices",
    "pool_features",
    "read_labels_file",
    "select",
    "subset",
]
