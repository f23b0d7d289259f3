"""An OpenAI-compatible HTTP server for a smolexport export (standard library + smolexport_runtime)."""

from .server import ApiError, ModelService, OpenAIServer, make_server, serve

__all__ = ["ApiError", "ModelService", "OpenAIServer", "make_server", "serve"]
