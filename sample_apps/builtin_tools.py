"""Two small built-in tools for the chat apps (`smolexport chat --tools`, the desktop chat's "Tools" box): a
calculator and the current time, and the round trip that offers them to the model.

`stream_with_tools(model, messages, added)` runs one assistant turn with the tools (SmolLM2's trained
tool-calling format, enforced by a grammar: smolexport_runtime/tools.py): a text answer streams as it comes;
a tool-call block is collected, each call is run here, its result goes back as a `tool` message, and the
model's final answer (text only) streams. The caller sees every step as a ToolEvent.

The calculator evaluates arithmetic by walking Python's `ast` (numbers, + - * / // % **, parentheses):
no names, attributes, calls or anything else, and bounded powers, so a model (or a user) cannot make it run
code or compute for minutes. A tool that fails (a bad expression, a division by zero) returns its error as
the result text; it never raises.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from smolexport_runtime import Model
from smolexport_runtime import tools as tool_calling
from smolexport_runtime.tools import ToolCall

MAX_EXPRESSION = 200  # characters
MAX_BITS = 4096  # an integer result (or operand) of more bits is refused: 2**4096 has 1,234 digits

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression with + - * / // % ** and parentheses",
            "parameters": {
                "type": "object",
                "properties": {
                    # The grammar holds the model to these characters: no room for anything but arithmetic.
                    "expression": {"type": "string", "pattern": "^[0-9+*/%(). -]{1,60}$"},
                },
                "required": ["expression"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "current_time",
            "description": "The current local date and time",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    },
]


class CalculatorError(ValueError):
    """An expression the calculator does not evaluate, or whose result it refuses."""


def _power(base: int | float, exponent: int | float) -> int | float:
    whole = isinstance(base, int) and isinstance(exponent, int)
    if whole and exponent > 0 and abs(base) > 1 and exponent * base.bit_length() > MAX_BITS:
        raise CalculatorError("the result is too large")  # refused before Python spends minutes on it
    return operator.pow(base, exponent)


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, e.g. "(17 + 25) * 2" -> 84. Raises CalculatorError for
    anything else (names, calls, attributes, strings), for a division by zero, and for results that are
    too large, not finite or not real."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("an expression is needed, e.g. 17 * 23")
    if len(expression) > MAX_EXPRESSION:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalculatorError(f"only numbers are allowed, not {value!r}")
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("the result is too large") from None
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    else:
        raise CalculatorError(f"only numbers and + - * / // % ** ( ) are allowed, not {_describe(node)}")
    if isinstance(value, complex):  # (-8) ** 0.5
        raise CalculatorError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise CalculatorError("the result is too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is too large")
    return value


def _describe(node: ast.AST) -> str:
    names = {ast.Name: "a name", ast.Attribute: "an attribute", ast.Call: "a function call"}
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        return f"the operator {type(node.op).__name__}"
    return names.get(type(node), f"'{type(node).__name__}'")


def current_time() -> str:
    return datetime.now().astimezone().strftime("%A %d %B %Y, %H:%M:%S %Z (UTC%z)")


def run_tool(call: ToolCall) -> str:
    """A tool call's result as the text that goes back to the model (JSON). Errors are results too."""
    try:
        if call.name == "calculator":
            expression = call.arguments.get("expression")
            return json.dumps({"expression": expression, "result": _number(calculate(expression))})
        if call.name == "current_time":
            return json.dumps({"time": current_time()})
        return json.dumps({"error": f"there is no tool named {call.name!r}"})
    except CalculatorError as exc:
        return json.dumps({"error": str(exc)})
    except Exception as exc:  # a tool must never take the chat down
        return json.dumps({"error": f"{call.name} failed: {exc}"})


def _number(value: int | float) -> int | float:
    """6.0 -> 6; floats to 12 significant digits (0.1 + 0.2 -> 0.3)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return float(f"{value:.12g}") if isinstance(value, float) else value


def describe_call(call: ToolCall) -> str:
    """A call as the apps show it: `calculator({"expression": "17 * 23"})`."""
    return f"{call.name}({json.dumps(call.arguments, ensure_ascii=False)})"


@dataclass(frozen=True)
class ToolEvent:
    """One step of a turn with tools: "text" (a piece of an answer), "call" (the model called a tool),
    "result" (the tool's result text, for `call`)."""

    kind: str
    text: str = ""
    call: ToolCall | None = None


def stream_with_tools(
    model: Model,
    messages: Sequence[Mapping[str, Any]],
    added: list[dict[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] = TOOLS,
    tool_choice: Any = "auto",
    parallel_tool_calls: bool = False,
    run: Callable[[ToolCall], str] = run_tool,
    **options: Any,
) -> Iterator[ToolEvent]:
    """One assistant turn with `tools` offered under `tool_choice` ("auto", "required", a tool's name...).
    One call at most unless `parallel_tool_calls` (the 135M model, allowed several, repeats its call).
    Yields ToolEvents. Appends to `added` the messages the turn put in the history before its final answer:
    the assistant's tool calls and one `tool` message per result; the caller appends the final answer (the
    text events) itself, so that an answer stopped half-way is kept as what was shown. `options` go to
    `model.stream` (max_new_tokens, temperature, ...). Raises what `model.stream` raises (e.g. a
    ConstraintError for a call block cut by max_new_tokens)."""
    parsed = tool_calling.parse_tools(tools)
    first = model.stream(
        tool_calling.render_messages(messages, parsed),
        response_format=tool_calling.grammar(parsed, tool_choice, parallel_tool_calls),
        **options,
    )
    # The grammar lets text start with anything but "<": an answer that starts so is a call block, which
    # is collected whole; any other answer streams as it comes.
    text = ""
    try:
        for piece in first:
            text += piece
            if piece and not text.startswith("<"):
                yield ToolEvent("text", piece)
    finally:
        first.close()  # type: ignore[attr-defined]
    calls = tool_calling.parse_calls(text, parsed)  # None for a text answer
    if calls is None:
        return  # a text answer, already streamed
    if calls:
        ids = [f"call_{i + 1}" for i in range(len(calls))]
        added.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for i, c in zip(ids, calls, strict=True)]})  # fmt: skip
        for call_id, call in zip(ids, calls, strict=True):
            yield ToolEvent("call", describe_call(call), call)
            result = run(call)
            added.append({"role": "tool", "tool_call_id": call_id, "content": result})
            yield ToolEvent("result", result, call)
    # The answer after the results (or after the trained "no call needed" empty list): text only.
    final = model.stream(
        tool_calling.render_messages([*messages, *added], parsed),
        response_format=tool_calling.grammar(parsed, "none"),
        **options,
    )
    try:
        for piece in final:
            if piece:
                yield ToolEvent("text", piece)
    finally:
        final.close()  # type: ignore[attr-defined]


def render(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = TOOLS) -> list:
    """The messages as the model sees them with `tools` (the tools' system prompt, the calls and results in
    the trained format): what to count when fitting a history with tool turns into the context."""
    return tool_calling.render_messages(messages, tool_calling.parse_tools(tools))


def without_tool_turns(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The history without its tool calls and results (each turn's question and final answer stay): what a
    chat whose tools were switched off sends."""
    return [dict(m) for m in messages if m.get("role") != "tool" and not m.get("tool_calls")]
