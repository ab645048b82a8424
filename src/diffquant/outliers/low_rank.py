"""SVDQuant's low-rank split of a (smoothed) weight: ``W = L1 L2 + R``.

``L1 L2`` is the best rank-``r`` approximation of ``W`` viewed as ``[O, fan_in]`` (the top ``r``
singular directions, from an SVD in float64), split evenly: ``L1 = U_r sqrt(S_r)``,
``L2 = sqrt(S_r) V_r^T``. The factors are rounded to the branch's dtype (float16 by default: the
branch runs in 16-bit beside the quantized GEMM); the residual ``R = W - L1 L2`` is computed
from the rounded factors, so ``L1 L2 + R`` reconstructs ``W`` whatever the dtype, and only ``R``
is quantized. One SVD, no iterative refit (deepcompressor refits up to 100 times against the
quantized residual's output error; not done here).
"""

from __future__ import annotations

import torch

from diffquant.quant.transforms import LOW_RANK_DTYPES


def low_rank_factors(weight: torch.Tensor, rank: int, dtype: str = "float16") -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1 [O, rank], L2 [rank, fan_in])`` of ``weight`` (any shape ``[O, ...]``), float32 holding ``dtype`` values.

    Raises:
        ValueError: If ``rank`` exceeds ``min(O, fan_in)``.
    """
    matrix = weight.detach().double().reshape(weight.shape[0], -1).cpu()
    if rank > min(matrix.shape):
        raise ValueError(f"rank {rank} is larger than min(out, in) = {min(matrix.shape)}")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root.unsqueeze(1) * vh[:rank]
    kind = LOW_RANK_DTYPES[dtype]
    return up.to(kind).float(), down.to(kind).float()


def residual(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``R = W - L1 L2`` in ``weight``'s shape (float32)."""
    product = (up.float() @ down.float()).reshape(weight.shape)
    return weight.detach().float() - product
