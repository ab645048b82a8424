"""Device and dtype of the PyTorch passes (``runtime.device`` / ``runtime.dtype``).

Quantizers keep their scales and statistics in float32 whatever the model's dtype; sampling keeps
its latents in float32 and casts only the denoiser's input. Helpers here move a batch to where a
module lives and bring results back to the CPU in float32 for storage.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from diffquant.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``runtime.device``.

    Args:
        name: ``auto`` (the first GPU torch sees, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError (``device``): A GPU was asked for and torch sees none, or not that many.
    """
    if name == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise ConfigError("device", f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(
            "device", f"{name} asked for, but torch sees no GPU (torch.cuda.is_available() is False); use auto or cpu"
        )
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError("device", f"{name} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


@functools.cache
def _cpu_runs(dtype: torch.dtype) -> bool:
    """Whether this CPU's torch runs a convolution and a matrix product in ``dtype``."""
    try:
        x = torch.ones(1, 2, 4, 4, dtype=dtype)
        torch.nn.functional.conv2d(x, torch.ones(2, 2, 3, 3, dtype=dtype), padding=1)
        torch.ones(4, 4, dtype=dtype) @ torch.ones(4, 4, dtype=dtype)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``runtime.dtype`` on ``device``.

    Raises:
        ConfigError (``dtype``): Unknown name, or a half type this CPU's torch cannot compute in.
    """
    if name not in DTYPES:
        raise ConfigError("dtype", f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype is not torch.float32 and not _cpu_runs(dtype):
        raise ConfigError("dtype", f"{name} does not run on this CPU's torch (no {name} convolution); use float32")
    return dtype


def resolve(device: str = "auto", dtype: str = "float32") -> tuple[torch.device, torch.dtype]:
    """``runtime.device`` and ``runtime.dtype`` as torch objects (see :func:`resolve_device`, :func:`resolve_dtype`)."""
    where = resolve_device(device)
    return where, resolve_dtype(dtype, where)


def place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move ``module`` to ``device`` and cast it to ``dtype``, keeping quantizers in float32 (in place).

    Modules whose class sets ``keeps_float32`` (the fake quantizers) are cast back to float32, and
    so are the submodules a diffusers model lists in ``_keep_in_fp32_modules`` (what diffusers'
    own ``from_pretrained(torch_dtype=...)`` keeps in float32). A module already there is left as
    it is.
    """
    if module_placement(module) == (device, dtype):
        return module
    nn.Module.to(module, device=device, dtype=dtype)  # diffusers' override only adds a warning about the next step
    if dtype is not torch.float32:
        keep: set[str] = set()
        for child in module.modules():
            keep |= set(getattr(child, "_keep_in_fp32_modules", None) or ())
        for name, child in module.named_modules():
            if getattr(type(child), "keeps_float32", False) or keep & set(name.split(".")):
                child.float()
    return module


def module_placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of ``module``'s first floating parameter (CPU float32 for a module without any)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.float32


def to_module(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` on ``device``; floating tensors also cast to ``dtype`` (ids and timesteps keep theirs)."""
    if dtype is not None and x.is_floating_point():
        return x.to(device=device, dtype=dtype)
    return x.to(device)


def to_storage(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the CPU, floating tensors as float32 (what the stores and the metrics take)."""
    return x.detach().to("cpu", torch.float32) if x.is_floating_point() else x.detach().cpu()
