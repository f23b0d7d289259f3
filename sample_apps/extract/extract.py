"""Extract a typed object from free text with an export, on `smolexport_runtime` only (and Pydantic for the
built-in types).

    python -m sample_apps.extract exports/smollm2-135m-int4 < email.txt                  # a Contact
    python -m sample_apps.extract exports/smollm2-135m-int4 --type invoice --input bill.txt
    python -m sample_apps.extract exports/smollm2-135m-int4 --schema order.schema.json < order.txt
    python -m sample_apps.extract exports/smollm2-135m-int4 --type mypackage.models:Ticket < ticket.txt

The answer is constrained to the type's JSON Schema token by token (`model.generate_json`, llguidance), so
it always parses into the type: keys, types, patterns, enums and bounds hold. Whether the values are the
text's is up to the model: a 135M model copies names and e-mail addresses well and invents what the text
does not say unless a field may be null. Prints the object as JSON.

    from sample_apps.extract import Contact, extract
    contact = extract(model, "Write to Ada Lovelace at ada@example.org", Contact)  # a Contact
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from smolexport_runtime import Model, SmolexportRuntimeError, load

SYSTEM = (
    "You extract information from the user's text into JSON. Copy names, addresses, numbers and dates "
    "exactly as the text gives them. Use null for a field the text does not give."
)
EMAIL = r"^[A-Za-z0-9._%+-]{1,40}@[A-Za-z0-9-]{1,30}(\.[A-Za-z0-9-]{1,30}){0,3}\.[A-Za-z]{2,10}$"


# Every field is required (null where the text says nothing) and bounded: a small model left an optional key
# or an unbounded string may skip the key or write until max_new_tokens (docs/embedding.md).
class Contact(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=60, description="the person's full name")
    email: str | None = Field(pattern=EMAIL, max_length=100, description="their e-mail address")
    phone: str | None = Field(pattern=r"^\+?[0-9][0-9 ().-]{4,20}$", description="their phone number")
    company: str | None = Field(max_length=60, description="the company or organisation they work for")


class Invoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vendor: str = Field(min_length=1, max_length=60, description="who issued the invoice")
    invoice_number: str | None = Field(max_length=30, description="the invoice's number or reference")
    date: datetime.date | None = Field(description="the invoice's date, as YYYY-MM-DD")
    total: float = Field(ge=0, le=10_000_000, description="the amount due")
    currency: Literal["EUR", "USD", "GBP", "CHF", "JPY", "CAD", "AUD"] = Field(description="the currency")


TYPES: dict[str, type[BaseModel]] = {"contact": Contact, "invoice": Invoice}


def schema_of(target: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
    return target.model_json_schema() if isinstance(target, type) else target


def field_list(schema: dict[str, Any]) -> str:
    """The schema's fields as prompt lines, "- name: description"."""
    lines = []
    for name, spec in (schema.get("properties") or {}).items():
        description = spec.get("description") if isinstance(spec, dict) else None
        lines.append(f"- {name}: {description}" if description else f"- {name}")
    return "\n".join(lines)


def extract(
    model: Model, text: str, target: type[BaseModel] | dict[str, Any] = Contact, *, max_new_tokens: int = 256
) -> Any:
    """The object `text` describes: an instance of `target` (a Pydantic model class), or for a JSON Schema
    (a dict) what json.loads gives, valid against it. Greedy. Raises ConstraintError when the answer was cut
    by max_new_tokens before the JSON closed, or for a schema the engine cannot enforce."""
    fields = field_list(schema_of(target))
    request = f"Fields:\n{fields}\n\nText:\n{text.strip()}" if fields else f"Text:\n{text.strip()}"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": request}]
    return model.generate_json(messages, target, max_new_tokens=max_new_tokens, greedy=True)


def resolve_type(name: str) -> type[BaseModel]:
    """A built-in type's name (contact, invoice) or `module:Class`, a Pydantic model of your own."""
    if name in TYPES:
        return TYPES[name]
    module_name, _, class_name = name.partition(":")
    if not class_name:
        raise ValueError(f"--type must be one of {', '.join(TYPES)} or module:Class, got {name!r}")
    target = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(target, type) and issubclass(target, BaseModel)):
        raise ValueError(f"{name} is not a Pydantic model class")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sample_apps.extract",
        description="Extract a typed object from text (stdin or --input) and print it as JSON.",
    )
    parser.add_argument("model_dir", help="an export folder")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--type", default="contact", help="contact (default), invoice, or module:Class (Pydantic)")
    what.add_argument("--schema", type=Path, default=None, help="a JSON Schema file instead of a type")
    parser.add_argument("--input", type=Path, default=None, help="the text (default: stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        target = json.loads(args.schema.read_text()) if args.schema else resolve_type(args.type)
        if args.schema and not isinstance(target, dict):
            raise ValueError(f"{args.schema} holds no JSON Schema object")
        text = args.input.read_text() if args.input else sys.stdin.read()
        if not text.strip():
            raise ValueError("no text to extract from (pipe it in, or give --input FILE)")
        model = load(args.model_dir, threads=args.threads)
        result = extract(model, text, target, max_new_tokens=args.max_new_tokens)
    except (SmolexportRuntimeError, OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    data = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
    print(json.dumps(data, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
