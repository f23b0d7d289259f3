"""Core ML export: an ML Program whose KV cache lives in Core ML states, plus a NumPy reference interpreter."""
