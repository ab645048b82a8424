"""Outlier methods for low-bit activations: per-channel shift, SmoothQuant and SVDQuant's low-rank branch.

- :mod:`~diffquant.outliers.options`: which layers of a plan get which method (from ``QuantizeSpec``);
- :mod:`~diffquant.outliers.stats`: per-channel input ranges (and input samples) from calibration;
- :mod:`~diffquant.outliers.folding`: where ``1 / s`` can be folded (a norm's affine, a previous layer),
  checked on the float model, and the weight transforms themselves;
- :mod:`~diffquant.outliers.smoothing`: SmoothQuant's scales and the per-layer alpha search;
- :mod:`~diffquant.outliers.low_rank`: the SVD split ``W = L1 L2 + R``;
- :mod:`~diffquant.outliers.calibrate`: all of it in order, for :func:`diffquant.ptq.quantize`.

The per-layer computation lives in :mod:`diffquant.quant.transforms`.
"""
