"""sample_apps/extract on the real 135M int4 (the tiny models' word-level tokenizers cannot drive the grammar):
the command reads text from stdin and prints an object valid against the type's schema; in Python the result
is the declared type."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest

from sample_apps.extract import Contact, Invoice, extract

from .conftest import REAL_EXPORT, REPO

pytestmark = pytest.mark.skipif(not REAL_EXPORT.is_dir(), reason=f"{REAL_EXPORT} not exported (README's first command)")

EMAIL = """Hi team,
please add our new supplier contact: Maria Gonzalez, sales lead at Nordwind Logistics.
She can be reached at maria.gonzalez@nordwind.de or +49 30 1234567.
Thanks, Tom
"""
BILL = """INVOICE
Acme Office Supplies Ltd
Invoice no. INV-2024-0042
Date: 2024-03-15

3 x printer paper   45.00
1 x stapler         12.50

Total due: 57.50 EUR
"""
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 40},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
        "paid": {"type": "boolean"},
    },
    "required": ["customer", "quantity", "paid"],
    "additionalProperties": False,
}


def run(*args, stdin):
    command = [sys.executable, "-m", "sample_apps.extract", str(REAL_EXPORT), *args]
    return subprocess.run(command, input=stdin, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_command_prints_an_object_of_the_type(tmp_path):
    result = run(stdin=EMAIL)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    jsonschema.validate(data, Contact.model_json_schema())
    assert isinstance(Contact.model_validate(data), Contact) and data["name"]

    schema = tmp_path / "order.schema.json"
    schema.write_text(json.dumps(ORDER_SCHEMA))
    result = run("--schema", str(schema), stdin="Bob Smith ordered 3 blue umbrellas and paid by card.")
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), ORDER_SCHEMA)


def test_errors_are_one_line(tmp_path):
    not_an_object = tmp_path / "true.json"
    not_an_object.write_text("true")
    for args, stdin, message in [((), "  \n", "no text"), (("--type", "nope"), "hi", "--type must be"),
                                 (("--schema", str(not_an_object)), "hi", "no JSON Schema object")]:  # fmt: skip
        result = run(*args, stdin=stdin)
        assert result.returncode == 1 and result.stderr.startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.stderr and not result.stdout


def test_extract_returns_the_declared_type(tmp_path):
    from smolexport_runtime import load

    model = load(REAL_EXPORT, providers="cpu")
    invoice = extract(model, BILL, Invoice)
    assert isinstance(invoice, Invoice) and invoice.vendor and invoice.total >= 0
    jsonschema.validate(invoice.model_dump(mode="json"), Invoice.model_json_schema())
    contact = extract(model, EMAIL, Contact)
    assert isinstance(contact, Contact)
    data = extract(model, "Bob Smith ordered 3 blue umbrellas.", ORDER_SCHEMA)  # a JSON Schema: a dict
    assert isinstance(data, dict)
    jsonschema.validate(data, ORDER_SCHEMA)
