"""ONNX export: a KV-cache decoder graph built directly from the checkpoint's weights."""
