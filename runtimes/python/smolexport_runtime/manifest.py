"""The export folder's manifest (`smolexport.json`): parsed into dataclasses and checked against the files.

Verification is on by default because a truncated download or a half-copied `model.onnx.data` otherwise
shows up much later as an obscure onnxruntime error or, worse, as a model that silently talks nonsense.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ManifestError

MANIFEST_NAME = "smolexport.json"
FORMAT = "smolexport-onnx"
FORMAT_VERSION = 1
KV_LAYOUT = "batch,kv_heads,seq,head_dim"
KV_DTYPES = ("float32", "float16", "int8")
# 4 MiB reads: large enough to hash multi-GB weight files at disk speed, small enough to stay off the heap.
HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int


@dataclass(frozen=True)
class IOSpec:
    """Graph input/output names. Per-layer names are templates with `{i}` for the layer index."""

    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def past_names(self, num_layers: int) -> list[str]:
        """Cache input names in the order the runtime keeps the cache: key 0, value 0, key 1, ..."""
        return [t.format(i=i) for i in range(num_layers) for t in (self.past_key, self.past_value)]

    def present_names(self, num_layers: int) -> list[str]:
        return [t.format(i=i) for i in range(num_layers) for t in (self.present_key, self.present_value)]


@dataclass(frozen=True)
class Manifest:
    folder: Path
    format_version: int
    model: ModelSpec
    io: IOSpec
    kv_dtype: str
    quant: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    tools: dict[str, Any] = field(default_factory=dict)
    graph: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Reads `folder/smolexport.json`; with `verify`, also checks every listed file's size and sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"no such export folder: {folder}")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder} is not a smolexport export folder: {MANIFEST_NAME} is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}). Re-export the model.") from None
    manifest = parse_manifest(raw, folder)
    if verify:
        verify_files(folder, manifest.files)
    return manifest


def parse_manifest(raw: Any, folder: Path) -> Manifest:
    if not isinstance(raw, dict):
        raise ManifestError(f"{folder / MANIFEST_NAME} is not a JSON object. Re-export the model.")
    fmt = raw.get("format")
    if fmt != FORMAT:
        raise ManifestError(f"{folder} holds format {fmt!r}, not {FORMAT!r}; this runtime cannot load it")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{folder / MANIFEST_NAME} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{folder} uses format_version {version}, newer than the {FORMAT_VERSION} this runtime reads; "
            "upgrade smolexport-runtime"
        )

    where = folder / MANIFEST_NAME
    m = _section(raw, "model", where)
    model = ModelSpec(
        architecture=str(_key(m, "architecture", "model", where)),
        **{name: _int(m, name, "model", where) for name in _MODEL_INTS},
    )
    kv = _section(raw, "kv_cache", where)
    layout = kv.get("layout", KV_LAYOUT)
    if layout != KV_LAYOUT:
        raise ManifestError(f"{where}: kv_cache.layout {layout!r} is not supported (expected {KV_LAYOUT!r})")
    kv_dtype = kv.get("dtype")
    if kv_dtype not in KV_DTYPES:
        raise ManifestError(f"{where}: kv_cache.dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")

    io_raw = raw.get("io") or {}
    # Missing name templates fall back to the documented defaults; an export always writes them anyway.
    templates = {
        k: io_raw[k] for k in ("past_key", "past_value", "present_key", "present_value") if k in io_raw
    }
    io = IOSpec(inputs=tuple(io_raw.get("inputs", ())), outputs=tuple(io_raw.get("outputs", ())), **templates)

    files = raw.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{where} lists no files. Re-export the model.")
    for rel, entry in files.items():
        _check_relative(rel, where)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise ManifestError(f"{where}: files[{rel!r}] has no sha256. Re-export the model.")

    return Manifest(
        folder=folder,
        format_version=version,
        model=model,
        io=io,
        kv_dtype=kv_dtype,
        quant=dict(raw.get("quant") or {}),
        source=dict(raw.get("source") or {}),
        files=files,
        tools=dict(raw.get("tools") or {}),
        graph=dict(raw.get("graph") or {}),
    )


def verify_files(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """Raises ManifestError naming the first listed file that is missing or differs from its checksum."""
    for rel, entry in files.items():
        path = folder / rel
        if not path.is_file():
            raise ManifestError(f"export folder {folder} is incomplete: {rel} is missing. Re-export it.")
        # The size check is free and catches truncated copies before spending time on a multi-GB hash.
        expected_bytes = entry.get("bytes")
        actual_bytes = path.stat().st_size
        if expected_bytes is not None and actual_bytes != expected_bytes:
            raise ManifestError(
                f"export folder {folder} is damaged: {rel} size mismatch "
                f"(expected {expected_bytes} bytes, got {actual_bytes}). Re-export it."
            )
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ManifestError(
                f"export folder {folder} is damaged: {rel} sha256 mismatch "
                f"(expected {entry['sha256']}, got {actual}). Re-export it."
            )


_MODEL_INTS = (
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "context_length",
)


def _section(raw: dict[str, Any], name: str, where: Path) -> dict[str, Any]:
    value = raw.get(name)
    if not isinstance(value, dict):
        raise ManifestError(f"{where} has no {name!r} section. Re-export the model.")
    return value


def _key(section: dict[str, Any], name: str, prefix: str, where: Path) -> Any:
    if name not in section:
        raise ManifestError(f"{where} is missing {prefix}.{name}. Re-export the model.")
    return section[name]


def _int(section: dict[str, Any], name: str, prefix: str, where: Path) -> int:
    value = _key(section, name, prefix, where)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ManifestError(f"{where}: {prefix}.{name} must be a positive integer, got {value!r}")
    return value


def _check_relative(rel: str, where: Path) -> None:
    # A manifest must not point outside its own folder (it may come from an untrusted download).
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or not rel:
        raise ManifestError(f"{where} lists a file outside the export folder: {rel!r}")
