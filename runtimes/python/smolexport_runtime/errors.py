"""Errors the runtime raises on purpose. Each message is one line that says what is wrong and what to do."""


class SmolexportRuntimeError(Exception):
    """Base class: catch this to handle every problem the runtime reports deliberately."""


class ManifestError(SmolexportRuntimeError):
    """The export folder is missing, damaged, or in a format this runtime does not read."""


class ContextLengthError(SmolexportRuntimeError):
    """The prompt does not fit in the model's context window."""


class ChatTemplateError(SmolexportRuntimeError):
    """Chat was requested but the model has no usable chat template, or the template refused the messages."""


class RequestError(SmolexportRuntimeError, ValueError):
    """A generation request the runtime cannot run: an empty or undecodable prompt, malformed messages, or
    sampling settings out of range. A ValueError too, which is what these raised before."""
