"""smolexport: put a small instruction-tuned Llama-architecture LLM on a device (ONNX, Core ML)."""

__version__ = "0.1.0"
