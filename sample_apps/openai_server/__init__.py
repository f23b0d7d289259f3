"""An OpenAI-compatible HTTP server for a smolexport export (smolexport_runtime, Starlette and uvicorn)."""

from .protocol import ApiError, GenerationRequest, parse_request
from .server import OpenAIServer, make_server, serve
from .service import ModelService
from .transport import check_api_key, create_app

__all__ = [
    "ApiError",
    "GenerationRequest",
    "ModelService",
    "OpenAIServer",
    "check_api_key",
    "create_app",
    "make_server",
    "parse_request",
    "serve",
]
