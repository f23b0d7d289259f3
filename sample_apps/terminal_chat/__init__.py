"""A multi-turn terminal chat over a smolexport export (`smolexport chat DIR`)."""

from .chat import chat, fit_history

__all__ = ["chat", "fit_history"]
