"""Extract a typed object (a Pydantic model or a JSON Schema) from free text:
`python -m sample_apps.extract DIR < text.txt`."""

from .extract import Contact, Invoice, extract

__all__ = ["Contact", "Invoice", "extract"]
