"""Export of quantized models: ONNX Q/DQ, TensorRT rules, onnxruntime parity, TensorRT engines.

Modules: :mod:`export.onnx`, :mod:`export.rules`, :mod:`export.parity`, :mod:`export.tensorrt`
(TensorRT imported lazily). The edge bundle and the compress-flow stage are not built yet.
"""
