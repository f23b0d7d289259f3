"""The server's OpenAI protocol as pure functions (sample_apps/openai_server/protocol.py): request bodies in,
GenerationRequest or ApiError out; answers and stream chunks in OpenAI's shapes. No model, no HTTP."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sample_apps.openai_server.protocol import (
    SSE_DONE,
    ApiError,
    GenerationRequest,
    ResponseBuilder,
    parse_json_body,
    parse_request,
    sse,
    tool_calls,
    usage,
)

USER = [{"role": "user", "content": "w5 w6"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
CALL = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'


def parse(body, chat=True, **limits):
    return parse_request(body, chat, **{"model": "tiny", "context_length": 256, **limits})


def error_of(body, chat=True, **limits) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, chat, **limits)
    return info.value


def stats(**fields):
    values = {"prompt_tokens": 5, "completion_tokens": 3, "cached_tokens": 2, "finish_reason": "length"}
    return SimpleNamespace(**{**values, **fields})


# --- requests ---------------------------------------------------------------------------------------


def test_a_chat_request_with_defaults():
    request = parse({"model": "tiny", "messages": USER}, default_max_tokens=64, default_temperature=0.3)
    assert request == GenerationRequest(
        prompt=USER, chat=True, max_tokens=64, temperature=0.3, top_p=1.0, seed=None, stop=[], stream=False,
        include_usage=False,
    )  # fmt: skip
    assert request.sampling() == {
        "max_new_tokens": 64, "temperature": 0.3, "top_p": 1.0, "seed": None, "stop": [], "chat": True,
    }  # fmt: skip


def test_a_chat_request_with_every_option():
    body = {
        "model": "tiny",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "w5 "}, {"type": "text", "text": "w6"}]},
        ],
        "max_tokens": 5,
        "max_completion_tokens": 7,  # wins over max_tokens, as in OpenAI's API
        "temperature": 1.5,
        "top_p": 0.5,
        "seed": -1,
        "stop": "w9",
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 1,
        "logit_bias": {},  # no bias: accepted
        "user": "someone",  # other OpenAI fields are ignored
    }
    request = parse(body)
    assert request.prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "w5 w6"}]
    assert (request.max_tokens, request.temperature, request.top_p) == (7, 1.5, 0.5)
    assert request.seed == 2**64 - 1 and request.stop == ["w9"] and request.stream and request.include_usage


@pytest.mark.parametrize("key", ["temperature", "top_p"])
def test_zero_temperature_or_top_p_is_greedy(key):
    sampling = parse({"model": "tiny", "messages": USER, "temperature": 0.8, key: 0}).sampling()
    assert sampling["temperature"] == 0.0 and sampling["top_p"] == 1.0


def test_a_completion_request_takes_a_prompt_or_a_list_of_one():
    for prompt in ("w5 w6", ["w5 w6"]):
        request = parse({"model": "tiny", "prompt": prompt, "messages": "ignored"}, chat=False)
        assert request.prompt == "w5 w6" and request.chat is False and request.tools is None


def test_response_formats():
    def fmt(value):
        return parse({"model": "tiny", "messages": USER, "response_format": value}).response_format

    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert fmt({"type": "text"}) is None
    assert fmt({"type": "json_object"}) == {"type": "json_object"}
    spec = {"name": "x", "schema": schema, "strict": True}
    expected = {"type": "json_schema", "json_schema": {"schema": schema}}  # the name and strict are dropped
    assert fmt({"type": "json_schema", "json_schema": spec}) == expected


def test_tools_render_into_the_prompt_and_become_the_grammar():
    request = parse({"model": "tiny", "messages": USER, "tools": [WEATHER], "tool_choice": "required"})
    assert request.tools[0].name == "get_weather" and request.tool_choice == "required"
    assert request.prompt[0]["role"] == "system" and "get_weather" in request.prompt[0]["content"]
    assert request.response_format["type"] == "lark"
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "sunny"}]  # fmt: skip
    request = parse({"model": "tiny", "messages": history, "tools": [WEATHER]})
    assert request.tool_choice == "auto" and CALL in request.prompt[2]["content"]
    assert "sunny" in request.prompt[3]["content"]


BAD = [
    # (body, status, code, param)
    ({"messages": USER}, 400, "missing_required_parameter", "model"),
    ({"model": "gpt-4", "messages": USER}, 404, "model_not_found", "model"),
    ({"model": "tiny"}, 400, "missing_required_parameter", "messages"),
    ({"model": "tiny", "messages": []}, 400, "invalid_value", "messages"),
    ({"model": "tiny", "messages": {"role": "user"}}, 400, "invalid_value", "messages"),
    ({"model": "tiny", "messages": ["w5"]}, 400, "invalid_value", "messages[0]"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "w5"}]}, 400, "invalid_value", "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": ["user"], "content": "w5"}]}, 400, "invalid_value", "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": None}]}, 400, "invalid_value", "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "invalid_value",
     "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "w5 \ud800"}]}, 400, "invalid_value",
     "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": None, "tool_calls": "f"}]}, 400,
     "invalid_value", "messages[0].tool_calls"),
    ({"model": "tiny", "messages": USER, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"model": "tiny", "messages": USER, "max_tokens": 257}, 400, "invalid_value", "max_tokens"),  # past the context
    ({"model": "tiny", "messages": USER, "max_tokens": True}, 400, "invalid_value", "max_tokens"),
    ({"model": "tiny", "messages": USER, "max_completion_tokens": 1.5}, 400, "invalid_value",
     "max_completion_tokens"),
    ({"model": "tiny", "messages": USER, "temperature": float("inf")}, 400, "invalid_value", "temperature"),
    ({"model": "tiny", "messages": USER, "temperature": 2.5}, 400, "invalid_value", "temperature"),
    ({"model": "tiny", "messages": USER, "top_p": -0.1}, 400, "invalid_value", "top_p"),
    ({"model": "tiny", "messages": USER, "seed": 2**64}, 400, "invalid_value", "seed"),
    ({"model": "tiny", "messages": USER, "stop": ["a", 3]}, 400, "invalid_value", "stop"),
    ({"model": "tiny", "messages": USER, "stop": ["w"] * 17}, 400, "invalid_value", "stop"),
    ({"model": "tiny", "messages": USER, "n": 2}, 400, "invalid_value", "n"),
    ({"model": "tiny", "messages": USER, "stream": 1}, 400, "invalid_value", "stream"),
    ({"model": "tiny", "messages": USER, "stream_options": "usage"}, 400, "invalid_value", "stream_options"),
    ({"model": "tiny", "messages": USER, "stream": True, "stream_options": {"include_usage": "false"}}, 400,
     "invalid_value", "stream_options"),
    ({"model": "tiny", "messages": USER, "stream_options": {"include_usage": True}}, 400, "invalid_value",
     "stream_options"),  # without stream
    ({"model": "tiny", "messages": USER, "temperature": 10**400}, 400, "invalid_value", "temperature"),
    ({"model": "tiny", "messages": USER, "top_p": -(10**400)}, 400, "invalid_value", "top_p"),
    ({"model": "tiny", "messages": USER, "logprobs": True}, 400, "unsupported_parameter", "logprobs"),
    ({"model": "tiny", "messages": USER, "top_logprobs": 3}, 400, "unsupported_parameter", "top_logprobs"),
    ({"model": "tiny", "messages": USER, "presence_penalty": 0.5}, 400, "unsupported_parameter",
     "presence_penalty"),
    ({"model": "tiny", "messages": USER, "function_call": "auto"}, 400, "unsupported_parameter", "function_call"),
    ({"model": "tiny", "messages": USER, "logit_bias": {"5": 1}}, 400, "unsupported_parameter", "logit_bias"),
    ({"model": "tiny", "messages": USER, "response_format": "json"}, 400, "invalid_value", "response_format.type"),
    ({"model": "tiny", "messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": 1}}},
     400, "invalid_value", "response_format.json_schema"),
    ({"model": "tiny", "messages": USER, "response_format": {"type": "json_schema",
      "json_schema": {"schema": {}, "strict": "yes"}}}, 400, "invalid_value", "response_format.json_schema.strict"),
    ({"model": "tiny", "messages": USER, "tool_choice": "auto"}, 400, "invalid_value", "tool_choice"),
    ({"model": "tiny", "messages": USER, "tools": [{"type": "retrieval"}]}, 400, "invalid_value", "tools"),
    ({"model": "tiny", "messages": USER, "tools": [WEATHER], "tool_choice": "get_time"}, 400, "invalid_value",
     "tool_choice"),
    ({"model": "tiny", "messages": USER, "tools": [WEATHER], "parallel_tool_calls": 1}, 400, "invalid_value",
     "parallel_tool_calls"),
    ({"model": "tiny", "messages": USER, "tools": [WEATHER], "response_format": {"type": "json_object"}}, 400,
     "invalid_value", "response_format"),
    ({"model": "tiny", "messages": [*USER, {"role": "tool", "content": "3"}]}, 400, "invalid_value", "tools"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "code", "param"), BAD, ids=[f"{i}-{case[3]}" for i, case in enumerate(BAD)])
def test_bad_chat_requests(body, status, code, param):
    error = error_of(body)
    assert (error.status, error.code, error.param, error.type) == (status, code, param, "invalid_request_error")
    assert error.message and error.body() == {"error": {"message": error.message, "type": error.type,
                                                        "param": param, "code": code}}  # fmt: skip


@pytest.mark.parametrize(
    ("body", "code"),
    [({"model": "tiny"}, "missing_required_parameter"), ({"model": "tiny", "prompt": ["a", "b"]}, "invalid_value"),
     ({"model": "tiny", "prompt": 5}, "invalid_value"), ({"model": "tiny", "prompt": "\udfff"}, "invalid_value")],
)  # fmt: skip
def test_bad_completion_requests(body, code):
    error = error_of(body, chat=False)
    assert (error.status, error.code, error.param) == (400, code, "prompt")


@pytest.mark.parametrize(("key", "value"), [("echo", True), ("suffix", "end"), ("best_of", 2), ("logprobs", 0)])
def test_completion_fields_that_would_change_the_answer_are_refused(key, value):
    error = error_of({"model": "tiny", "prompt": "w5", key: value}, chat=False)
    assert (error.status, error.code, error.param) == (400, "unsupported_parameter", key)


def test_default_values_of_unsupported_fields_are_accepted():
    parse({"model": "tiny", "messages": USER, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0,
           "stream": False, "stream_options": None, "user": "u1"})  # fmt: skip
    parse({"model": "tiny", "prompt": "w5", "echo": False, "best_of": 1, "logprobs": None}, chat=False)


@pytest.mark.parametrize(
    "raw", [b"", b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe\x00", b"[" * 100_000, b"{" * 50_000], ids=str
)
def test_bodies_that_are_no_json_object(raw):
    with pytest.raises(ApiError) as info:
        parse_json_body(raw)
    assert (info.value.status, info.value.code) == (400, "invalid_json")


def test_a_json_body():
    assert parse_json_body('{"model": "tiny", "x": NaN, "é": "\\ud800"}'.encode()) == pytest.approx(
        {"model": "tiny", "x": float("nan"), "é": "\ud800"}, nan_ok=True
    )  # NaN and lone surrogates are left for parse_request to refuse


# --- responses --------------------------------------------------------------------------------------


def test_usage_reports_cached_prompt_tokens():
    assert usage(stats()) == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                              "prompt_tokens_details": {"cached_tokens": 2}}  # fmt: skip


def test_a_chat_completion():
    builder = ResponseBuilder("tiny", chat=True, created=7)
    answer = builder.completion("hello", stats())
    assert answer == {
        "id": builder.id, "object": "chat.completion", "created": 7, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "logprobs": None,
                     "finish_reason": "length"}],
        "usage": usage(stats()),
    }  # fmt: skip
    assert builder.id.startswith("chatcmpl-") and builder.id != ResponseBuilder("tiny", chat=True).id
    assert builder.completion("", stats(finish_reason=None))["choices"][0]["finish_reason"] == "stop"


def test_a_text_completion():
    builder = ResponseBuilder("tiny", chat=False)
    answer = builder.completion("hello", stats(finish_reason="stop"))
    assert answer["object"] == "text_completion" and builder.id.startswith("cmpl-")
    assert answer["choices"] == [{"index": 0, "text": "hello", "logprobs": None, "finish_reason": "stop"}]


def test_a_chat_stream():
    builder = ResponseBuilder("tiny", chat=True, include_usage=True, created=7)
    chunks = [*builder.start(), *builder.piece("hel"), *builder.piece("lo"), *builder.finish(stats())]
    assert [c["choices"][0]["delta"] if c["choices"] else None for c in chunks] == [
        {"role": "assistant", "content": ""}, {"content": "hel"}, {"content": "lo"}, {}, None]  # fmt: skip
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, None, "length"]
    assert chunks[-1]["usage"] == usage(stats()) and chunks[-1]["choices"] == []
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks} == {
        (builder.id, "chat.completion.chunk", 7, "tiny")}  # fmt: skip


def test_a_text_completion_stream_without_usage():
    builder = ResponseBuilder("tiny", chat=False)
    chunks = [*builder.start(), *builder.piece("hi"), *builder.finish(stats(finish_reason="stop"))]
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}],
    ]
    assert {c["object"] for c in chunks} == {"text_completion"}


def test_tool_calls_whole_and_streamed():
    request = parse({"model": "tiny", "messages": USER, "tools": [WEATHER]})
    builder = ResponseBuilder("tiny", True, request.tools, request.tool_choice)
    answer = builder.completion(CALL, stats(finish_reason="stop"))
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # Streamed: the block is held to its end, then sent as one delta.tool_calls per call.
    stream = ResponseBuilder("tiny", True, request.tools, request.tool_choice)
    held = [chunk for piece in (CALL[:5], CALL[5:30], CALL[30:]) for chunk in stream.piece(piece)]
    assert held == []
    end = stream.finish(stats(finish_reason="stop"))
    assert end[0]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert end[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert end[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_text_answers_with_tools():
    request = parse({"model": "tiny", "messages": USER, "tools": [WEATHER]})
    stream = ResponseBuilder("tiny", True, request.tools, request.tool_choice)
    # "<to" may open a call block: held until the answer shows it is text, then passed on as it comes.
    assert stream.piece("<to") == [] and stream.piece("o warm") != [] and stream.piece("!") != []
    sent = [*stream.piece(" ok")]
    assert sent[0]["choices"][0]["delta"] == {"content": " ok"}
    assert stream.finish(stats(finish_reason="stop"))[-1]["choices"][0]["finish_reason"] == "stop"
    # tool_choice "none": a call block is text.
    none = ResponseBuilder("tiny", True, request.tools, "none")
    assert none.completion(CALL, stats())["choices"][0]["message"]["content"] == CALL
    assert none.piece(CALL) == [] and none.finish(stats())[0]["choices"][0]["delta"] == {"content": CALL}
    # A block cut short (max_tokens) is no call: its text is the answer.
    cut = CALL[:-4]
    assert tool_calls(cut, request.tools) is None
    answer = ResponseBuilder("tiny", True, request.tools, "auto").completion(cut, stats())
    assert answer["choices"][0]["message"]["content"] == cut


def test_server_sent_events():
    assert sse({"a": "é"}) == 'data: {"a": "é"}\n\n'.encode()
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert ResponseBuilder("tiny", True).error()["error"]["type"] == "server_error"
