"""smolexport-runtime: run smolexport ONNX exports with onnxruntime and tokenizers, without torch.

Usage::

    from smolexport_runtime import load

    model = load("exports/smollm2-135m-int4")
    for piece in model.stream("What is the capital of France?"):
        print(piece, end="", flush=True)
"""

from .batching import BatchEngine, BatchRequest, EngineStoppedError, QueueFullError
from .chat import ChatTemplate
from .conversation import Conversation, ConversationBusyError, PromptCacheError
from .errors import ChatTemplateError, ContextLengthError, ManifestError, SmolexportRuntimeError
from .generate import GenerationStats, decode_one_token, prefill
from .manifest import Manifest, load_manifest
from .model import Model, load
from .sampling import SamplingConfig, make_sampler
from .sequence import SequenceState, run_sequence, stream_generate
from .session import OnnxDecoder, resolve_providers

__version__ = "0.1.0"

__all__ = [
    "BatchEngine",
    "BatchRequest",
    "Conversation",
    "EngineStoppedError",
    "ConversationBusyError",
    "PromptCacheError",
    "QueueFullError",
    "ChatTemplate",
    "ChatTemplateError",
    "ContextLengthError",
    "GenerationStats",
    "Manifest",
    "ManifestError",
    "Model",
    "OnnxDecoder",
    "SamplingConfig",
    "SequenceState",
    "SmolexportRuntimeError",
    "decode_one_token",
    "load",
    "load_manifest",
    "make_sampler",
    "prefill",
    "resolve_providers",
    "run_sequence",
    "stream_generate",
]
