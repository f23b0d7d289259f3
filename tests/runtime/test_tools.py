"""Tool calling (tools.py) on the real 135M int4: with tool_choice required or named every answer is calls to
defined tools whose arguments validate; with auto, text or calls, and both parse; results go back in the
trained format."""

from __future__ import annotations

import json

import jsonschema
import pytest
from smolexport_runtime import load
from smolexport_runtime import tools as tool_calling
from smolexport_runtime.constraints import ConstraintError

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                       "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"],
                       "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -10**6, "maximum": 10**6},
                       "b": {"type": "integer", "minimum": -10**6, "maximum": 10**6}}, "required": ["a", "b"],
                       "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now", "description": "The current time"}},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}
QUESTIONS = [
    "What's the weather like in Paris?",
    "How much is 17 plus 25?",
    "What time is it?",
    "Is it raining in Tokyo, in fahrenheit?",
    "Write a haiku about autumn.",
]


@pytest.fixture(scope="module")
def real(bundled_exports):
    return load(bundled_exports / "int4", providers="cpu")


def assert_valid_calls(calls, allowed=None):
    assert calls, "no tool call"
    for call in calls:
        assert call.name in (allowed or SCHEMAS)
        jsonschema.validate(call.arguments, SCHEMAS[call.name])


@pytest.mark.parametrize("sampling", [{"greedy": True}, {"temperature": 0.9, "seed": 3}])
def test_required_and_named_choices_always_call_a_defined_tool(real, sampling):
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        text, calls = real.chat_with_tools(messages, TOOLS, "required", max_new_tokens=200, **sampling)
        assert text is None
        assert_valid_calls(calls)
        named = {"type": "function", "function": {"name": "add"}}
        text, calls = real.chat_with_tools(messages, TOOLS, named, max_new_tokens=200, **sampling)
        assert text is None
        assert_valid_calls(calls, allowed={"add"})


def test_auto_gives_text_or_calls_and_none_gives_text(real):
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        text, calls = real.chat_with_tools(messages, TOOLS, "auto", max_new_tokens=120)
        assert (text is None) != (not calls)
        if calls:
            assert_valid_calls(calls)
        text, calls = real.chat_with_tools(messages, TOOLS, "none", max_new_tokens=40)
        assert text and not calls and not text.startswith("<")


def test_a_two_step_round_trip_renders_the_trained_format(real):
    messages = [{"role": "user", "content": "What's the weather like in Paris?"}]
    _, calls = real.chat_with_tools(messages, TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert calls[0].name == "get_weather"
    history = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for c in calls]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21, "sky": "sunny"}'},
    ]  # fmt: skip
    rendered = tool_calling.render_messages(history, tool_calling.parse_tools(TOOLS))
    assert rendered[0]["role"] == "system" and "<tools>[" in rendered[0]["content"]
    assert json.loads(rendered[0]["content"].split("<tools>")[1].split("</tools>")[0])[1]["name"] == "add"
    assert rendered[2]["content"].startswith('<tool_call>[{"name": "get_weather", "arguments": {')
    assert rendered[3] == {"role": "tool", "content": '<tool_response>{"celsius": 21, "sky": "sunny"}</tool_response>'}
    text, calls = real.chat_with_tools(history, TOOLS, "none", max_new_tokens=40)
    assert text and not calls


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        ([], "auto", "non-empty list"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}}}],
         "required", "cannot be enforced"),
        (TOOLS, "missing_tool", "tool_choice must be"),
        ([{"type": "retrieval"}], "auto", "only function tools"),
        ([{"function": {"name": "f"}}, {"function": {"name": "f"}}], "auto", "unique function name"),
    ],
)  # fmt: skip
def test_bad_tools_are_refused_up_front(real, tools, choice, message):
    with pytest.raises(ConstraintError, match=message):
        real.chat_with_tools([{"role": "user", "content": "hi"}], tools, choice, max_new_tokens=4)


def test_only_an_answer_that_starts_with_a_block_is_calls():
    parsed = tool_calling.parse_tools(TOOLS)
    block = '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}]</tool_call>'
    assert tool_calling.parse_calls(block, parsed) == [tool_calling.ToolCall("add", {"a": 1, "b": 2})]
    assert tool_calling.parse_calls(" " + block, parsed) is None  # text (the grammar lets no text start so)
    assert tool_calling.parse_calls("<tool_call>[]</tool_call>", parsed) == []
    for bad in ('<tool_call>[{"name": "rm_rf", "arguments": {}}]</tool_call>',
                '<tool_call>[{"name": "add", "arguments": 5}]</tool_call>',
                "<tool_call>[{]</tool_call>", '<tool_call>[{"name": "add"'):  # fmt: skip
        with pytest.raises(ConstraintError):
            tool_calling.parse_calls(bad, parsed)
    with pytest.raises(ConstraintError, match="tool_choice must be"):
        tool_calling.grammar(parsed, {"type": "function", "function": "add"})
    with pytest.raises(ConstraintError, match="function with a name"):
        tool_calling.render_messages([{"role": "assistant", "tool_calls": [{"function": "x"}]}], parsed)


def test_the_auto_grammar_allows_the_trained_empty_list_and_no_spaced_block(real):
    grammar = real.grammar_tokenizer()
    parsed = tool_calling.parse_tools(TOOLS)
    compiled = grammar.compile(__import__("smolexport_runtime.constraints").constraints.parse_response_format(
        tool_calling.grammar(parsed, "auto")))  # fmt: skip
    for text, accepted in (("<tool_call>[]</tool_call>", True), ("Sure.", True),
                           (' <tool_call>[{"name": "now", "arguments": {}}]</tool_call>', False)):  # fmt: skip
        matcher = grammar.matcher(compiled)
        ids = real.tokenizer.encode(text, add_special_tokens=False).ids
        assert (matcher.consume_tokens(ids) and matcher.is_accepting()) == accepted, text
