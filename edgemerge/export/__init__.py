"""Exporters: ONNX (switchable and plain graphs). TensorRT and flat images build on these."""
