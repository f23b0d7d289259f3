"""Manifest parsing and file verification: a damaged or foreign folder fails at load with one clear line."""

import json
import re

import pytest
from smolexport_runtime import ManifestError, SmolexportRuntimeError, load_manifest
from smolexport_runtime.manifest import sha256_file

from .conftest import write_manifest


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "model.onnx.data").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "tokenizer.json").write_text("{}")
    write_manifest(tmp_path)
    return tmp_path


def rewrite(folder, **changes):
    manifest = json.loads((folder / "smolexport.json").read_text())
    manifest.update(changes)
    (folder / "smolexport.json").write_text(json.dumps(manifest))


def test_valid_folder_loads(folder):
    manifest = load_manifest(folder)
    assert manifest.model.num_layers == 2 and manifest.kv_dtype == "float32"
    assert set(manifest.files) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert manifest.io.past_names(2) == [
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert manifest.io.present_names(1) == ["present.0.key", "present.0.value"]


def test_missing_file_is_named(folder):
    (folder / "model.onnx.data").unlink()
    with pytest.raises(ManifestError, match=r"incomplete: model\.onnx\.data is missing"):
        load_manifest(folder)
    load_manifest(folder, verify=False)  # the caller may skip the check


def test_altered_file_is_named_with_both_hashes(folder):
    data = bytearray((folder / "model.onnx.data").read_bytes())
    data[100] ^= 1  # same size, different content
    (folder / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"damaged: model\.onnx\.data sha256 mismatch") as info:
        load_manifest(folder)
    message = str(info.value)
    assert sha256_file(folder / "model.onnx.data") in message and "Re-export" in message
    assert "\n" not in message
    assert isinstance(info.value, SmolexportRuntimeError)


def test_truncated_file_is_caught_by_size(folder):
    (folder / "tokenizer.json").write_text("{ }")
    with pytest.raises(ManifestError, match=r"tokenizer\.json size mismatch \(expected 2 bytes, got 3\)"):
        load_manifest(folder)


def test_not_an_export(tmp_path):
    with pytest.raises(ManifestError, match="no such export folder"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ManifestError, match="smolexport.json is missing"):
        load_manifest(tmp_path)
    (tmp_path / "smolexport.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "something-else"}, "not 'smolexport-onnx'"),
        ({"format_version": 3}, "newer than the 2 this runtime reads; upgrade smolexport-runtime"),
        ({"format_version": "1"}, "invalid format_version"),
        ({"kv_cache": {"layout": "batch,seq,kv_heads,head_dim", "dtype": "float32"}}, "layout"),
        ({"kv_cache": {"layout": "batch,kv_heads,seq,head_dim", "dtype": "bfloat16"}}, "kv_cache.dtype"),
        ({"model": {"architecture": "llama"}}, "missing model.num_layers"),
        ({"files": {"../escape": {"sha256": "0"}}}, "outside the export folder"),
        ({"files": {}}, "lists no files"),
    ],
)
def test_format_surprises(folder, changes, message):
    rewrite(folder, **changes)
    with pytest.raises(ManifestError, match=re.escape(message)):
        load_manifest(folder, verify=False)
