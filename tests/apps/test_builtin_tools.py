"""The chat apps' built-in tools (sample_apps/builtin_tools.py): the calculator alone (arithmetic only, through
`ast`; never eval), tool errors as results, and the terminal chat's tool round trip on the real 135M int4
(a named tool_choice forces the call, so the round trip is deterministic; the tiny models' word-level
tokenizers cannot drive the grammar)."""

from __future__ import annotations

import io
import json
import time

import jsonschema
import pytest
from click.testing import CliRunner
from smolexport_runtime import load
from smolexport_runtime.tools import ToolCall

from sample_apps import builtin_tools
from sample_apps.builtin_tools import TOOLS, CalculatorError, calculate, describe_call, run_tool
from sample_apps.terminal_chat import chat
from smolexport.cli import main

from .conftest import REAL_EXPORT

CALCULATOR = {"type": "function", "function": {"name": "calculator"}}
SCHEMA = TOOLS[0]["function"]["parameters"]


@pytest.mark.parametrize(
    ("expression", "value"),
    [("17 * 23", 391), ("(17 + 25) * 2", 84), ("7 / 2", 3.5), ("7 // 2", 3), ("-7 % 3", 2), ("2 ** 10", 1024),
     ("-(3 - 5)", 2), ("+4", 4), ("1.5 * 4", 6.0), ("2 ** -1", 0.5), (" 1 + 1 ", 2), ("2 ** 4095 > 0", None)],
)  # fmt: skip
def test_the_calculator_does_arithmetic(expression, value):
    if value is None:  # a comparison is not arithmetic
        with pytest.raises(CalculatorError):
            calculate(expression)
    else:
        assert calculate(expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("x + 1", "a name"),
        ("__import__('os').system('echo hi')", "a function call"),
        ("(1).real", "an attribute"),
        ("abs(-1)", "a function call"),
        ("'a' * 3", "only numbers"),
        ("True + 1", "only numbers"),
        ("1j * 2", "only numbers"),
        ("[1, 2]", "not 'List'"),
        ("lambda: 1", "not 'Lambda'"),
        ("1 << 100000", "the operator LShift"),
        ("2 **", "not an arithmetic expression"),
        ("", "an expression is needed"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("9 ** 9 ** 9", "too large"),
        ("2 ** 100000", "too large"),
        ("(2 ** 2000) * (2 ** 2000) * (2 ** 2000)", "too large"),
        ("10.0 ** 400", "too large"),
        ("1e308 * 10", "too large"),
        ("(-8) ** 0.5", "not a real number"),
        ("1 + " * 60 + "1", "longer than"),
    ],
)
def test_the_calculator_refuses_everything_else_quickly(expression, message):
    started = time.perf_counter()
    with pytest.raises(CalculatorError, match=message):
        calculate(expression)
    assert time.perf_counter() - started < 1  # a refused power is never computed


def test_tool_errors_are_results_never_exceptions():
    assert json.loads(run_tool(ToolCall("calculator", {"expression": "6*7"}))) == {"expression": "6*7", "result": 42}
    assert json.loads(run_tool(ToolCall("calculator", {"expression": "1 / 0"}))) == {"error": "division by zero"}
    assert json.loads(run_tool(ToolCall("calculator", {"expression": "0.1 + 0.2"})))["result"] == 0.3
    assert json.loads(run_tool(ToolCall("calculator", {"expression": "1 / 3e20"})))["result"] == 3.33333333333e-21
    assert "error" in json.loads(run_tool(ToolCall("calculator", {})))  # no expression
    assert "error" in json.loads(run_tool(ToolCall("calculator", {"expression": 12})))  # not a string
    assert "no tool named" in json.loads(run_tool(ToolCall("rm_rf", {})))["error"]
    assert json.loads(run_tool(ToolCall("current_time", {})))["time"][:4].isalpha()  # "Monday 07 December..."
    # The grammar holds the model's expressions to arithmetic characters.
    jsonschema.validate({"expression": "(17 + 25) * 2"}, SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"expression": "__import__('os')"}, SCHEMA)


@pytest.fixture(scope="module")
def real():
    if not REAL_EXPORT.is_dir():
        pytest.skip(f"{REAL_EXPORT} not exported (README's first command)")
    return load(REAL_EXPORT, providers="cpu")


def test_terminal_chat_shows_a_call_its_result_and_the_answer(real):
    out = io.StringIO()
    history = chat(real, stdin=io.StringIO("What is 17 times 23?\n"), stdout=out, temperature=0, max_new_tokens=100,
                   tools=True, tool_choice=CALCULATOR)  # fmt: skip
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    (call,) = history[1]["tool_calls"]
    arguments = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "calculator" and history[1]["content"] is None
    jsonschema.validate(arguments, SCHEMA)
    result = run_tool(ToolCall("calculator", arguments))  # what the tool gave, sent back as the tool turn
    assert history[2] == {"role": "tool", "tool_call_id": call["id"], "content": result}
    answer = history[3]["content"]
    assert answer.strip()
    text = out.getvalue()
    shown_call = f"[tool call] {describe_call(ToolCall('calculator', arguments))}\n"
    shown_result = f"[tool result] {result}\n"
    assert text.endswith(f"> What is 17 times 23?\n{shown_call}{shown_result}{answer}\n> \n")

    # A second turn: the history with the call and its result goes back through the trained format.
    out2 = io.StringIO()
    more = chat(real, stdin=io.StringIO("What is 17 times 23?\nAnd what time is it?\n"), stdout=out2, temperature=0,
                max_new_tokens=100, tools=True, tool_choice="required")  # fmt: skip
    assert [m["role"] for m in more] == ["user", "assistant", "tool", "assistant"] * 2
    assert "error" not in out2.getvalue()


def test_a_failing_tool_becomes_the_result_text(real, monkeypatch):
    def broken(expression):
        raise CalculatorError("the calculator is out of order")

    monkeypatch.setattr(builtin_tools, "calculate", broken)
    out = io.StringIO()
    history = chat(real, stdin=io.StringIO("What is 2 plus 2?\n"), stdout=out, temperature=0, max_new_tokens=100,
                   tools=True, tool_choice=CALCULATOR)  # fmt: skip
    assert history[2]["content"] == '{"error": "the calculator is out of order"}'
    assert '[tool result] {"error": "the calculator is out of order"}' in out.getvalue()
    assert history[3]["role"] == "assistant" and "error:" not in out.getvalue()  # the chat went on


def test_chat_command_offers_the_tools_with_auto(real):
    """`smolexport chat --tools`: the turn is the one chat_with_tools gives under "auto" (the tools' system
    prompt and grammar), shown as text or as a call and its result."""
    question = "What is 17 times 23?"
    result = CliRunner().invoke(main, ["chat", str(REAL_EXPORT), "--tools", "--temperature", "0", "--max-new-tokens",
                                       "100"], input=question + "\n", catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0 and "error" not in result.output, result.output
    text, calls = real.chat_with_tools([{"role": "user", "content": question}], TOOLS, "auto",
                                       parallel_tool_calls=False, max_new_tokens=100, temperature=0)  # fmt: skip
    if calls:
        assert f"[tool call] {describe_call(calls[0])}\n[tool result] " in result.output
    else:
        assert f"> {question}\n{text}\n" in result.output
