"""Export of quantized models (ONNX Q/DQ, TensorRT, edge bundles).

Not implemented in this release: the compress flow reports the export stage as skipped.
"""
