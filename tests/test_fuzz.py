"""Property tests (hypothesis, bounded): whatever a manifest, a prompt cache file or a server request holds,
the reader gives a result or an error of its documented type, and writes nothing.

Inputs are random JSON and byte strings, and mutations of valid ones (a value swapped somewhere in a real
manifest or request, bytes flipped or cut in a real cache file), since purely random inputs rarely get past
the first check.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smolexport_runtime import SamplingConfig, SmolexportRuntimeError, load, load_manifest
from smolexport_runtime.conversation import PromptCacheError

from sample_apps.openai_server.protocol import ApiError, parse_json_body, parse_request
from tests.runtime.conftest import make_export

FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def paths_of(value, prefix=()):
    """Every key path into a JSON value (dict keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_of(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths_of(item, (*prefix, index))


def replaced(value, path, new):
    if not path:
        return new
    copy = list(value) if isinstance(value, list) else dict(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


@st.composite
def mutations(draw, valid):
    """`valid` with up to three values swapped for random JSON, or a key dropped."""
    value = valid
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths_of(value))))
        if path and draw(st.booleans()) and isinstance(parent := _at(value, path[:-1]), dict):
            value = replaced(value, path[:-1], {k: v for k, v in parent.items() if k != path[-1]})
        else:
            value = replaced(value, path, draw(json_values))
    return value


def _at(value, path):
    for key in path:
        value = value[key]
    return value


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def fuzz_export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("fuzz") / "export")


@pytest.fixture(scope="module")
def valid_manifest(fuzz_export) -> dict:
    return json.loads((fuzz_export / "smolexport.json").read_text())


@FUZZ
@given(data=st.data())
def test_any_manifest_loads_or_raises_a_manifest_error(fuzz_export, valid_manifest, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("m") / "export"
    shutil.copytree(fuzz_export, folder)
    manifest = data.draw(mutations(valid_manifest) | json_values)
    (folder / "smolexport.json").write_text(json.dumps(manifest))
    before = snapshot(folder)
    try:
        load_manifest(folder)
        load(folder, providers="cpu", threads=1).generate("w5", max_new_tokens=1, chat=False)
    except SmolexportRuntimeError:
        pass
    assert snapshot(folder) == before
    shutil.rmtree(folder.parent)


@pytest.fixture(scope="module")
def cache_file(fuzz_export, tmp_path_factory) -> tuple[object, bytes]:
    model = load(fuzz_export, verify=False)
    path = tmp_path_factory.mktemp("cache") / "system.npz"
    model.default_conversation.save_prefix(path, [{"role": "system", "content": "w10 w11 w12 w13"}])
    return model, path.read_bytes()


@st.composite
def damaged_bytes(draw, good: bytes):
    data = bytearray(good)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "overwrite"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
    return bytes(data)


@FUZZ
@given(data=st.data())
def test_any_prompt_cache_file_loads_or_raises_a_prompt_cache_error(cache_file, tmp_path_factory, data):
    model, good = cache_file
    folder = tmp_path_factory.mktemp("c")
    path = folder / "system.npz"
    path.write_bytes(data.draw(damaged_bytes(good) | st.binary(max_size=256)))
    before = snapshot(folder)
    with contextlib.suppress(PromptCacheError):
        model.default_conversation.load_prefix(path)
    assert snapshot(folder) == before
    shutil.rmtree(folder)


VALID_REQUEST = {
    "model": "tiny",
    "messages": [{"role": "system", "content": "w3"}, {"role": "user", "content": "w5 w6"}],
    "max_tokens": 4,
    "temperature": 0.5,
    "top_p": 0.9,
    "seed": 3,
    "stop": ["w9"],
    "stream": True,
    "stream_options": {"include_usage": True},
}


@FUZZ
@given(data=st.data())
def test_any_request_body_parses_or_gets_a_4xx(fuzz_export, data):
    model = load(fuzz_export, verify=False)
    body = data.draw(mutations(VALID_REQUEST) | json_values)
    chat = data.draw(st.booleans())
    if not chat and isinstance(body, dict):
        body = {**body, "prompt": body.get("messages")}
    raw = json.dumps(body).encode()  # what a client sends (NaN and lone surrogates survive the trip)
    try:
        request = parse_request(parse_json_body(raw), chat, model="tiny", context_length=256, default_max_tokens=16)
    except ApiError as exc:
        assert 400 <= exc.status < 500
        return
    SamplingConfig(**{k: v for k, v in request.sampling().items() if k in ("temperature", "top_p", "seed")})
    with contextlib.suppress(SmolexportRuntimeError):  # what check_prompt answers with a 400
        model.encode(request.prompt, chat=request.chat)
