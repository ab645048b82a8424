"""Range calibration: run calibration data through the model and set every activation scale."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffquant.quant.plan import activation_quantizers
from diffquant.sampling import Trajectories, denoiser_outputs

logger = logging.getLogger(__name__)

ForwardLoop = Callable[[nn.Module], Any]
"""A callable that runs the module over calibration data (ModelOpt's ``forward_loop``)."""


@torch.no_grad()
def calibrate_activations(
    unet: nn.Module,
    calib: Trajectories | ForwardLoop,
    conditional: bool = True,
    batch_size: int = 256,
    seed: int = 0,
) -> int:
    """Run the calibration data through ``unet`` and set every activation quantizer's scale.

    Input and output quantizers observe the same forward passes; all of them observe before any
    quantizes, so each range is that of the float model's activations.

    Args:
        unet: The denoiser with the plan applied (quantizers not yet calibrated).
        calib: A calibration set (denoiser inputs, run in batches of ``batch_size``), or a
            callable ``forward_loop(unet)`` that runs the module over the caller's own data.
        conditional: Pass the set's conditions to the denoiser (calibration sets only).
        batch_size: Inputs per forward pass (calibration sets only).
        seed: Seed of the observers' reservoir sampling.

    Returns:
        The number of activation quantizers calibrated.
    """
    quantizers = activation_quantizers(unet)
    for quantizer in quantizers.values():
        quantizer.start_observing(seed)
    if isinstance(calib, Trajectories):
        denoiser_outputs(unet, calib, conditional, batch_size, description="Calibrating activations")
        seen = f"{len(calib)} inputs"
    else:
        calib(unet)
        seen = "the caller's forward loop"
    for quantizer in quantizers.values():
        quantizer.finish_observing()
    logger.info("calibrated %d activation quantizers on %s", len(quantizers), seen)
    return len(quantizers)
