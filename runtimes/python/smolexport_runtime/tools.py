"""Tool calling in SmolLM2's trained format, enforced by a grammar.

SmolLM2-1.7B-Instruct was trained on function calling (APIGen data): the tools are listed in the system prompt
inside `<tools>...</tools>`, and the model answers with `<tool_call>[{"name": ..., "arguments": {...}}]
</tool_call>`. Its chat template has no tools branch, so the system prompt is written here, with the wording
of the model card's function-calling example (checked against a published Ollama template of the model).
Tool results go back into the conversation as `tool` turns holding `<tool_response>...</tool_response>`.

`tool_choice`: "auto" (a grammar that allows free text or one tool-call block), "required" (a block), a
tool's name (a block calling that tool only), "none" (text only). Every call's arguments validate against
the tool's JSON Schema, enforced token by token (constraints.py); a schema that cannot be enforced is
refused up front.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .constraints import ConstraintError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 4
SYSTEM_PROMPT = """You are an expert in composing functions. You are given a question and a set of possible functions.
Based on the question, you will need to make one or more function/tool calls to achieve the purpose.
If none of the functions can be used, point it out and refuse to answer.
If the given question lacks the parameters required by the function, also point it out.

You have access to the following tools:
<tools>{tools}</tools>

The output MUST strictly adhere to the following format, and NO other text MUST be included.
The example format is as follows. Please make sure the parameter type is correct. If no function call is needed, please make the tool calls an empty list '[]'.
<tool_call>[
{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},
... (more tool calls as required)
]</tool_call>"""  # noqa: E501  # the trained wording, one line per line


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def listing(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def parse_tools(tools: Sequence[Any]) -> list[Tool]:
    """Tools as OpenAI sends them ({"type": "function", "function": {...}}) or as {"name", "description",
    "parameters"} dicts."""
    if isinstance(tools, str | bytes) or not isinstance(tools, Sequence) or not tools:
        raise ConstraintError("tools must be a non-empty list of functions")
    parsed: list[Tool] = []
    for i, tool in enumerate(tools):
        spec = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if isinstance(tool, Mapping) and tool.get("type", "function") != "function":
            raise ConstraintError(f"tools[{i}]: only function tools are supported")
        name = spec.get("name") if isinstance(spec, Mapping) else None
        if not isinstance(name, str) or not name or any(t.name == name for t in parsed):
            raise ConstraintError(f"tools[{i}] needs a unique function name")
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise ConstraintError(f"tools[{i}].parameters must be a JSON Schema object")
        description = spec.get("description") or ""
        parsed.append(Tool(name, str(description), dict(parameters)))
    return parsed


def system_prompt(tools: Sequence[Tool], system: str | None = None) -> str:
    prompt = SYSTEM_PROMPT.format(tools=json.dumps([t.listing() for t in tools], ensure_ascii=False))
    return prompt if not system else f"{prompt}\n\n{system}"


def render_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it: the tools in the system prompt, an assistant's tool
    calls as its `<tool_call>` block, a tool result as a `tool` turn in `<tool_response>`."""
    rendered: list[dict[str, Any]] = []
    system = None
    for message in messages:
        role = message.get("role")
        if role == "system" and not rendered and system is None:
            system = message.get("content")
            continue
        if role == "assistant" and message.get("tool_calls"):
            rendered.append(
                {"role": "assistant", "content": call_block(_openai_calls(message["tool_calls"]))}
            )
        elif role == "tool":
            rendered.append(
                {"role": "tool", "content": f"<tool_response>{message.get('content')}</tool_response>"}
            )
        else:
            rendered.append(dict(message))
    return [{"role": "system", "content": system_prompt(tools, system)}, *rendered]


def call_block(calls: Sequence[ToolCall]) -> str:
    body = ", ".join(
        json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False) for c in calls
    )
    return f"{CALL_OPEN}[{body}]{CALL_CLOSE}"


def grammar(tools: Sequence[Tool], tool_choice: Any = "auto", parallel: bool = True) -> dict[str, str]:
    """A Lark response_format for `tool_choice`: each call is a JSON object whose name is one of the tools
    and whose arguments follow that tool's schema."""
    tool_choice = choice_name(tool_choice)
    names = [t.name for t in tools]
    if tool_choice not in ("auto", "required", "none") and tool_choice not in names:
        raise ConstraintError(
            f"tool_choice must be 'auto', 'required', 'none' or a tool's name, got {tool_choice!r}"
        )
    allowed = [t for t in tools if tool_choice in ("auto", "required") or t.name == tool_choice]
    # At most MAX_PARALLEL_CALLS calls: a small model may otherwise repeat the same call until max_new_tokens.
    counts = range(1, (MAX_PARALLEL_CALLS if parallel else 1) + 1)
    calls = "(" + " | ".join(" ".join(["call", *['", " call'] * (n - 1)]) for n in counts) + ")"
    if tool_choice == "auto":  # the trained prompt's "no call needed": an empty list
        calls += "?"
    rules = [
        f'block: "{CALL_OPEN}[" {calls} "]{CALL_CLOSE}"',
        "call: " + " | ".join(f"c{i}" for i in range(len(allowed))),
    ]
    for i, tool in enumerate(allowed):
        schema = {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
            # Compact, as the trained format writes calls: no free whitespace for the model to wander into.
            "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
        }
        rules.append(f"c{i}: %json {json.dumps(schema)}")
    # Text must not start with "<": an answer that starts a tool-call block has to finish it.
    # Only an answer that starts with the block is read as calls (parse_calls): text may not start with
    # a space before one.
    text = r"TEXT: /[^<\s](.|\n)*/"
    start = {"none": "start: TEXT", "auto": "start: block | TEXT"}.get(tool_choice, "start: block")
    return {"type": "lark", "grammar": "\n".join([start, *rules, text]) + "\n"}


def parse_calls(text: str, tools: Sequence[Tool] | None = None) -> list[ToolCall] | None:
    """The tool calls of an answer that starts with a call block (as the grammar writes them), or None for a
    text answer; [] for the empty list the trained prompt allows. Raises ConstraintError for a block that
    was cut short or names no tool of `tools`."""
    if not text.startswith(CALL_OPEN):
        return None
    body = text.rstrip()
    if not body.endswith(CALL_CLOSE):
        raise ConstraintError("the answer's tool-call block was cut before it closed (raise max_new_tokens?)")
    try:
        items = json.loads(body[len(CALL_OPEN) : -len(CALL_CLOSE)])
        calls = [ToolCall(item["name"], item["arguments"]) for item in items]
    except (ValueError, KeyError, TypeError):
        raise ConstraintError("the answer's tool-call block is not a list of calls") from None
    names = None if tools is None else {t.name for t in tools}
    if any(not isinstance(c.arguments, dict) or (names is not None and c.name not in names) for c in calls):
        raise ConstraintError("the answer calls a tool that is not defined, or without an argument object")
    return calls


def choice_name(tool_choice: Any) -> Any:
    """tool_choice as a string: OpenAI's {"type": "function", "function": {"name": ...}} gives the name."""
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ConstraintError("tool_choice must be {'type': 'function', 'function': {'name': ...}}")
        return function["name"]
    return tool_choice


def _openai_calls(tool_calls: Sequence[Any]) -> list[ToolCall]:
    calls = []
    for call in tool_calls:
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ConstraintError("each tool call needs a function with a name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise ConstraintError("a tool call's arguments are not JSON") from None
        calls.append(ToolCall(str(function.get("name")), arguments))
    return calls
