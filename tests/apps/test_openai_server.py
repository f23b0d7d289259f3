"""The OpenAI-compatible server, driven by the official `openai` client against a tiny export."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from sample_apps.openai_server import make_server

from .conftest import REAL_EXPORT, slow_model

openai = pytest.importorskip("openai")


def start(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def server(tiny_export):
    # A 2 ms delay per token so that concurrent requests really overlap in time.
    srv = make_server(tiny_export, port=0, model=slow_model(tiny_export, 0.002, ban_eos=False), model_name="tiny")
    thread = start(srv)
    yield srv
    stop(srv, thread)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def health(server) -> dict:
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=10) as response:
        return json.load(response)


def expected(server, prompt, **kwargs):
    """What the runtime itself answers (the server must be idle)."""
    model = server.service.model
    text = model.generate(prompt, **kwargs)
    return text, model.last_stats


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    status = health(server)
    assert status["status"] == "ok" and status["model"] == "tiny" and status["busy"] is False


def test_chat_completion_matches_runtime(client, server):
    messages = [{"role": "system", "content": "w9 w10"}, {"role": "user", "content": "w5 w6 w7"}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    text, stats = expected(server, messages, max_new_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text and text
    assert choice.finish_reason == "length"
    assert response.object == "chat.completion" and response.model == "tiny" and response.id.startswith("chatcmpl-")
    usage = response.usage
    assert usage.prompt_tokens == stats.prompt_tokens == len(server.service.model.encode(messages))
    assert usage.completion_tokens == 12 and usage.total_tokens == usage.prompt_tokens + 12


def test_chat_stream_matches_non_stream(client):
    messages = [{"role": "user", "content": "w42 w43"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1  # streamed piece by piece
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_raw_completions(client, server):
    response = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=8, temperature=0)
    text, stats = expected(server, "w5 w6", chat=False, max_new_tokens=8, temperature=0)
    assert response.choices[0].text == text and response.object == "text_completion"
    assert response.usage.prompt_tokens == stats.prompt_tokens == 2
    streamed = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_strings(client, server, as_list):
    messages = [{"role": "user", "content": "w100"}]
    full, _ = expected(server, messages, max_new_tokens=16, temperature=0)
    words = full.split()
    stop_word = next((w for w in words if w != words[0]), words[0])
    stop = [stop_word, "zzz"] if as_list else stop_word
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stop=stop)
    want, stats = expected(server, messages, max_new_tokens=16, temperature=0, stop=stop)
    assert response.choices[0].message.content == want == full[: full.index(stop_word)]
    assert response.choices[0].finish_reason == "stop" == stats.finish_reason
    assert stop_word not in response.choices[0].message.content


def test_seeded_sampling_is_reproducible(client, server):
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "w7"}], "max_tokens": 12}
    first = client.chat.completions.create(**kwargs, temperature=1.3, top_p=0.95, seed=11)
    again = client.chat.completions.create(**kwargs, temperature=1.3, top_p=0.95, seed=11)
    text, _ = expected(server, kwargs["messages"], max_new_tokens=12, temperature=1.3, top_p=0.95, seed=11)
    assert first.choices[0].message.content == again.choices[0].message.content == text


def test_concurrent_streaming_clients_get_their_own_answers(server):
    prompts = [f"w{5 + 11 * i} w{6 + 7 * i}" for i in range(10)]

    def ask(prompt):
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=20, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = [ask(p) for p in prompts]
    assert len(set(alone)) > 1  # different prompts, different answers: a mix-up would show
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    status = health(server)
    assert status["busy"] is False and status["queued"] == 0


def test_prompt_lookup_in_the_server_gives_greedys_answer(tiny_model):
    """The tiny model repeats itself, so drafts copied from its text are kept; its fp32 text is unchanged."""
    messages = [{"role": "user", "content": "w5 w6 w7 w8 w5 w6 w7 w8 w5 w6"}]
    tiny_model.reset()
    plain = tiny_model.generate(messages, max_new_tokens=24, greedy=True)
    srv = make_server(port=0, model=tiny_model, model_name="tiny", prompt_lookup=4)
    thread = start(srv)
    try:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
        assert answer.choices[0].message.content == plain
        assert srv.service.engine.steps < answer.usage.completion_tokens  # drafts were kept
    finally:
        stop(srv, thread)


def test_api_key_is_required_when_set(tiny_model):
    srv = make_server(port=0, api_key="s3cret", model=tiny_model, model_name="tiny")
    thread = start(srv)
    try:
        bad = openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        with pytest.raises(urllib.error.HTTPError) as info:  # no Authorization header at all
            urllib.request.urlopen(srv.url + "/models", timeout=10)
        assert info.value.code == 401 and json.load(info.value)["error"]["code"] == "invalid_api_key"
        assert health(srv)["status"] == "ok"  # health checks need no key
        good = openai.OpenAI(base_url=srv.url, api_key="s3cret", max_retries=0)
        answer = good.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "w5"}], max_tokens=3, temperature=0
        )
        assert answer.usage.completion_tokens == 3
    finally:
        stop(srv, thread)


def test_a_non_ascii_api_key_matches_a_utf8_client(tiny_model):
    import http.client

    srv = make_server(port=0, api_key="clé-ü", model=tiny_model, model_name="tiny")
    thread = start(srv)
    try:
        host, port = srv.server_address[:2]
        for key, status in (("clé-ü", 200), ("cle-u", 401)):
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.putrequest("GET", "/v1/models")
            conn.putheader("Authorization", b"Bearer " + key.encode("utf-8"))  # what a UTF-8 client sends
            conn.endheaders()
            assert conn.getresponse().status == status
            conn.close()
    finally:
        stop(srv, thread)


def test_openai_client_sees_errors_as_exceptions(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "w5"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5 " * 400}])
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}], max_tokens=0)
    assert info.value.param == "max_tokens"


@pytest.mark.skipif(not REAL_EXPORT.is_dir(), reason=f"{REAL_EXPORT} not exported")
def test_real_model_answers():
    srv = make_server(REAL_EXPORT, port=0)
    thread = start(srv)
    try:
        client = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=60)
        response = client.chat.completions.create(
            model="smollm2-135m-int4",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32,
            temperature=0,
            stop=["."],  # the default int4 goes on about the City of Light: its first sentence is the answer
        )
        assert "Paris" in response.choices[0].message.content and "." not in response.choices[0].message.content
        assert response.choices[0].finish_reason == "stop" and response.usage.completion_tokens < 32
    finally:
        stop(srv, thread)


@pytest.mark.skipif(not REAL_EXPORT.is_dir(), reason=f"{REAL_EXPORT} not exported")
def test_real_model_structured_output_with_the_openai_client():
    """client.chat.completions.parse with a Pydantic model, and a json_schema stream: both parse."""
    pydantic = pytest.importorskip("pydantic")

    class Capital(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        country: str
        capital: str

    srv = make_server(REAL_EXPORT, port=0)
    thread = start(srv)
    try:
        client = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "What is the capital of France? Answer as JSON."}]
        parsed = client.chat.completions.parse(
            model="smollm2-135m-int4", messages=messages, response_format=Capital, temperature=0, max_tokens=40
        )
        answer = parsed.choices[0].message.parsed
        assert isinstance(answer, Capital) and "Paris" in answer.capital
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                  "required": ["city"], "additionalProperties": False}  # fmt: skip
        stream = client.chat.completions.create(
            model="smollm2-135m-int4", messages=messages, temperature=0, max_tokens=40, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}},
        )  # fmt: skip
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert set(json.loads(text)) == {"city"}
        # Tools: a named choice gives a call whose arguments parse; the result goes back for the answer.
        weather = {"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                           "required": ["city"], "additionalProperties": False}}}  # fmt: skip
        question = [{"role": "user", "content": "What's the weather like in Paris?"}]
        # Greedy (the server samples at 0.7 by default), one call: allowed parallel calls, the 135M repeats the
        # same call up to the limit of 4, past max_tokens (finish_reason "length"; seen in CI, sampled).
        called = client.chat.completions.create(
            model="smollm2-135m-int4", messages=question, tools=[weather], tool_choice="required", max_tokens=60,
            temperature=0, parallel_tool_calls=False,
        )  # fmt: skip
        choice = called.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
        streamed = client.chat.completions.create(
            model="smollm2-135m-int4", messages=question, tools=[weather], tool_choice="required", max_tokens=60,
            stream=True, temperature=0, parallel_tool_calls=False,
        )  # fmt: skip
        deltas = [c.choices[0] for c in streamed if c.choices]
        calls = [t for d in deltas for t in (d.delta.tool_calls or [])]
        assert calls and calls[0].index == 0 and calls[0].function.name == "get_weather"
        assert deltas[-1].finish_reason == "tool_calls" and not "".join(d.delta.content or "" for d in deltas)
        history = [
            *question,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21, "sky": "sunny"}'},
        ]
        answer = client.chat.completions.create(
            model="smollm2-135m-int4", messages=history, tools=[weather], tool_choice="none", max_tokens=30
        )
        assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
    finally:
        stop(srv, thread)
