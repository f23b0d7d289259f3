"""`smolexport validate`: compare an export with its PyTorch original on prompts and a text."""

from .report import ValidationReport, validate_export

__all__ = ["ValidationReport", "validate_export"]
