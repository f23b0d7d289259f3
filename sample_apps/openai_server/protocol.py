"""The OpenAI protocol, as pure functions: request bodies in, response and error shapes out. No I/O, no model.

`parse_request(body, chat, ...)` turns a decoded JSON body into a `GenerationRequest` or raises `ApiError`
(OpenAI's error shape with the HTTP status, `param` and `code` a client library reads). `ResponseBuilder`
makes a generation's answer: the whole `chat.completion` / `text_completion` object, or the chunks of its
Server-Sent Events stream (including a tool call held back until its block is complete).
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from smolexport_runtime import tools as tool_calling
from smolexport_runtime.constraints import ConstraintError
from smolexport_runtime.tools import Tool

MAX_STOP_STRINGS = 16
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# Request fields this server does not implement, each with the values that ask for nothing (their defaults).
# Any other value is refused with a 400 instead of being silently ignored: a client that relies on it would
# otherwise get an answer without it and no signal.
_LEGACY = (None, [], {}, "none")
UNSUPPORTED_CHAT = {
    "functions": _LEGACY, "function_call": _LEGACY, "logit_bias": _LEGACY, "logprobs": (None, False),
    "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
}  # fmt: skip
UNSUPPORTED_COMPLETIONS = {
    "functions": _LEGACY, "function_call": _LEGACY, "logit_bias": _LEGACY, "logprobs": (None,),
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
}  # fmt: skip
SSE_DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """An error answered with OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def server_busy(message: str = "the server is busy; retry later") -> ApiError:
    return ApiError(503, message, type="server_error", code="server_busy")


# --- requests -------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    prompt: str | list[dict[str, str]]
    chat: bool
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    response_format: dict[str, Any] | None = None  # validated OpenAI shape, compiled at submit
    tools: list[Tool] | None = None  # with tools, `prompt` holds them and response_format is their grammar
    tool_choice: Any = None

    def sampling(self) -> dict[str, Any]:
        # top_p -> 0 narrows the nucleus to the single most likely token: greedy.
        greedy = self.temperature == 0 or self.top_p == 0
        return {
            "max_new_tokens": self.max_tokens,
            "temperature": 0.0 if greedy else self.temperature,
            "top_p": 1.0 if greedy else self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "chat": self.chat,
        }


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A request body: a JSON object in UTF-8, or a 400."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def parse_request(
    body: dict[str, Any],
    chat: bool,
    *,
    model: str,
    context_length: int,
    default_max_tokens: int = 512,
    default_temperature: float = 0.7,
) -> GenerationRequest:
    """A /v1/chat/completions (`chat`) or /v1/completions body for the model named `model`, whose requests
    hold at most `context_length` tokens. Raises ApiError (4xx) for anything a client must fix."""
    name = body.get("model")
    if name is None:
        raise ApiError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
    if name != model:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {model!r}",
            param="model",
            code="model_not_found",
        )
    if body.get("n") not in (None, 1):
        raise invalid("n", "only n=1 is supported")
    for key, allowed in (UNSUPPORTED_CHAT if chat else UNSUPPORTED_COMPLETIONS).items():
        if body.get(key) not in allowed:
            raise ApiError(400, f"{key} is not supported by this server", param=key, code="unsupported_parameter")
    prompt = _messages(body) if chat else _completion_prompt(body)
    tools, tool_choice, parallel = _tools(body) if chat else (None, None, True)
    response_format = _response_format(body)
    if tools is not None:
        if response_format is not None:
            raise invalid("response_format", "response_format and tools cannot be used together")
        try:
            prompt = tool_calling.render_messages(prompt, tools)
        except ConstraintError as exc:  # e.g. an earlier call whose arguments are not JSON
            raise invalid("messages", str(exc)) from None
        response_format = tool_calling.grammar(tools, tool_choice, parallel)
    elif chat and any(m["role"] == "tool" or m.get("tool_calls") for m in prompt):
        raise invalid("tools", "a history with tool calls or tool results needs the tools that made them")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise invalid("stream", "stream must be a boolean")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise invalid("stream_options", "stream_options is only allowed when stream is true")
    options = options or {}
    if not isinstance(options, dict):
        raise invalid("stream_options", "stream_options must be an object")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool | None):
        raise invalid("stream_options", "stream_options.include_usage must be a boolean")
    return GenerationRequest(
        prompt=prompt,
        chat=chat,
        max_tokens=_integer(body, max_key, default_max_tokens, 1, context_length),  # type: ignore[arg-type]
        temperature=_number(body, "temperature", default_temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=_seed(body),
        stop=_stop(body),
        stream=bool(stream),
        include_usage=bool(include_usage),
        response_format=response_format,
        tools=tools,
        tool_choice=tool_choice,
    )


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(key, f"{key} must be a number")
    if isinstance(value, int) and not low <= value <= high:  # a huge JSON integer overflows a float
        raise invalid(key, f"{key} must be between {low:g} and {high:g}")
    if not math.isfinite(value):
        raise invalid(key, f"{key} must be a number")
    if not low <= value <= high:
        raise invalid(key, f"{key} must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _integer(body: dict, key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(key, f"{key} must be an integer")
    if not low <= value <= high:
        raise invalid(key, f"{key} must be between {low} and {high}, got {value}")
    return value


def _seed(body: dict) -> int | None:
    seed = _integer(body, "seed", None, -(2**63), 2**64 - 1)
    return None if seed is None else seed % 2**64  # numpy wants a non-negative seed


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "stop must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"stop takes at most {MAX_STOP_STRINGS} strings")
    return stops


def _text(value: str, param: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which is no text a tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(param, f"{param} holds an unpaired surrogate (\\ud800-\\udfff): not valid text") from None
    return value


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return _text(content, f"messages[{index}].content")
    if isinstance(content, list):  # content parts: only text is supported
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{index}].content", "only text content parts are supported")
            texts.append(part["text"])
        return _text("".join(texts), f"messages[{index}].content")
    raise invalid(f"messages[{index}].content", "content must be a string or a list of text parts")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(
            400, "you must provide a messages parameter", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}]", "each message must be an object with role and content")
        role = message.get("role")
        role = ROLES.get(role) if isinstance(role, str) else None  # a list or object is no role (nor a dict key)
        if role is None:
            raise invalid(f"messages[{i}].role", f"role must be one of {', '.join(ROLES)}")
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls:  # an earlier answer that called tools: its content may be null
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise invalid(f"messages[{i}].tool_calls", "tool_calls must be a list of objects")
            content = message.get("content")
            text = "" if content is None else _message_text(content, i)
            result.append({"role": role, "content": text, "tool_calls": calls})
            continue
        result.append({"role": role, "content": _message_text(message.get("content"), i)})
    return result


def _tools(body: dict) -> tuple[list[Tool] | None, Any, bool]:
    """tools (SmolLM2's trained format, runtime tools.py), tool_choice and parallel_tool_calls."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "parallel_tool_calls must be a boolean")
    if tools in (None, []):
        if choice not in (None, "none"):
            raise invalid("tool_choice", "tool_choice needs tools")
        return None, None, parallel
    try:
        parsed = tool_calling.parse_tools(tools)
        tool_calling.grammar(parsed, "auto" if choice is None else choice, parallel)  # checks tool_choice
    except ConstraintError as exc:
        raise invalid("tool_choice" if "tool_choice" in str(exc) else "tools", str(exc)) from None
    return parsed, "auto" if choice is None else choice, parallel


def _response_format(body: dict) -> dict[str, Any] | None:
    """OpenAI's response_format: text, json_object, or json_schema {name, schema, strict}."""
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise invalid("response_format.json_schema", "json_schema must be an object with a 'schema' object")
        if not isinstance(spec.get("strict", False), bool):
            raise invalid("response_format.json_schema.strict", "strict must be a boolean")
        # Enforced by the grammar whether or not strict is set: the answer always matches the schema.
        return {"type": "json_schema", "json_schema": {"schema": spec.get("schema", {})}}
    raise invalid("response_format.type", "response_format.type must be 'text', 'json_object' or 'json_schema'")


def _completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if prompt is None:
        raise ApiError(400, "you must provide a prompt parameter", param="prompt", code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise invalid("prompt", "prompt must be a string (or a list of one string)")
    return _text(prompt, "prompt")


# --- responses ------------------------------------------------------------------------------------


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "smolexport"}


def usage(stats: Any) -> dict[str, Any]:
    """`stats`: anything with prompt_tokens, completion_tokens and cached_tokens (the runtime's GenerationStats)."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        # OpenAI's field for the prompt tokens served from the cache (a conversation's earlier turns).
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def tool_calls(text: str, tools: list[Tool]) -> list[dict[str, Any]] | None:
    """An answer's tool calls in OpenAI's shape, or None for a text answer (or a block cut short)."""
    try:
        calls = tool_calling.parse_calls(text, tools)
    except (ConstraintError, ValueError, KeyError, TypeError):
        return None
    return [
        {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
        for c in calls or ()
    ] or None  # fmt: skip


def sse(payload: dict[str, Any]) -> bytes:
    """One Server-Sent Event."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


@dataclass
class ResponseBuilder:
    """The answer to one generation: `completion(text, stats)` whole, or `start()`, `piece(text)` per piece
    and `finish(stats)` as the chunks of a stream. A stream with tools passes text on as it comes, but an answer
    that opens a tool-call block is held to its end and sent as delta.tool_calls, one per call, keyed by index."""

    model: str
    chat: bool
    tools: list[Tool] | None = None
    tool_choice: Any = None
    include_usage: bool = False
    id: str = ""
    created: int = 0
    _held: str = field(default="", repr=False)  # the start of a tool answer, until it is text or calls
    _is_text: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]

    @property
    def _calls_allowed(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def completion(self, text: str, stats: Any) -> dict[str, Any]:
        calls = tool_calls(text, self.tools) if self._calls_allowed else None  # type: ignore[arg-type]
        finish = stats.finish_reason or "stop"
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            choice: dict[str, Any] = {"index": 0, "message": message}
            finish = "tool_calls"
        elif self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish)
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [choice], "usage": usage(stats)}

    def start(self) -> list[dict[str, Any]]:
        """A chat stream's first chunk carries the role."""
        return [self._chunk("", first=True)] if self.chat else []

    def piece(self, text: str) -> list[dict[str, Any]]:
        if not self.tools or self._is_text:
            return [self._chunk(text)]
        self._held += text
        opener = tool_calling.CALL_OPEN
        if self._held.startswith(opener) or opener.startswith(self._held):
            return []  # may still be a call block: hold it
        self._is_text = True
        return [self._chunk(self._held)]

    def finish(self, stats: Any) -> list[dict[str, Any]]:
        chunks, finish = [], stats.finish_reason or "stop"
        calls = None
        if self.tools and not self._is_text:
            calls = tool_calls(self._held, self.tools) if self._calls_allowed else None
            if calls:
                for index, call in enumerate(calls):
                    chunk = self._chunk(None)
                    chunk["choices"][0]["delta"]["tool_calls"] = [{"index": index, **call}]
                    chunks.append(chunk)
                finish = "tool_calls"
            elif self._held:
                chunks.append(self._chunk(self._held))
        chunks.append(self._chunk(None if self.chat else "", finish_reason=finish))
        if self.include_usage:
            chunks.append({**self._head(self._chunk_object), "choices": [], "usage": usage(stats)})
        return chunks

    def error(self) -> dict[str, Any]:
        """What a stream sends when its generation fails after its head went out."""
        return ApiError(500, "internal server error while generating", type="server_error").body()

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk(self, delta: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": {}}
            if first:
                choice["delta"]["role"] = "assistant"
            if delta is not None:
                choice["delta"]["content"] = delta
        else:
            choice = {"index": 0, "text": delta or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return {**self._head(self._chunk_object), "choices": [choice]}
