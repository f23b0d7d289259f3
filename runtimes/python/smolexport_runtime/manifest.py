"""The export folder's manifest (`smolexport.json`): parsed into dataclasses and checked against the files.

Verification is on by default because a truncated download or a half-copied `model.onnx.data` otherwise
shows up much later as an obscure onnxruntime error or, worse, as a model that silently talks nonsense.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ManifestError

MANIFEST_NAME = "smolexport.json"
FORMAT = "smolexport-onnx"
# 2: the graph's path is graph.file (onnx/model_q4.onnx, ...: the layout transformers.js loads); 1: model.onnx
FORMAT_VERSION = 2
LEGACY_GRAPH_FILE = "model.onnx"
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
    graph_file: str = LEGACY_GRAPH_FILE  # the ONNX graph, relative to the folder


def is_weight_data(name: str) -> bool:
    """External weight files (`model.onnx.data`, `onnx/model_q4.onnx_data`): raw tensor bytes at offsets the
    (already verified) graph gives, the only files onnxruntime may read before their checksum is known."""
    return name.endswith((".data", "_data"))


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
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{path} is {path.stat().st_size} bytes, too large for a manifest. Re-export the model."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"cannot read {path} ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ManifestError(f"{path} is not valid JSON ({_short(exc)}). Re-export the model.") from None
    manifest = parse_manifest(raw, folder)
    if verify:
        verify_files(folder, manifest.files)
    return manifest


def parse_manifest(raw: Any, folder: Path) -> Manifest:
    """The manifest as dataclasses; every value a runtime relies on is checked for type and range here, so
    that a damaged or hostile manifest fails at load with a ManifestError, never later inside onnxruntime."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{folder / MANIFEST_NAME} is not a JSON object. Re-export the model.")
    fmt = raw.get("format")
    if fmt != FORMAT:
        raise ManifestError(
            f"{folder} holds format {_short(fmt)}, not {FORMAT!r}; this runtime cannot load it"
        )
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{folder / MANIFEST_NAME} has an invalid format_version {_short(version)}")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{folder} uses format_version {version}, newer than the {FORMAT_VERSION} this runtime reads; "
            "upgrade smolexport-runtime"
        )

    where = folder / MANIFEST_NAME
    m = _section(raw, "model", where)
    architecture = _key(m, "architecture", "model", where)
    if not isinstance(architecture, str):
        raise ManifestError(f"{where}: model.architecture must be a string, got {_short(architecture)}")
    model = ModelSpec(
        architecture=architecture,
        **{name: _int(m, name, "model", where, high) for name, high in _MODEL_INTS.items()},
    )
    kv = _section(raw, "kv_cache", where)
    layout = kv.get("layout", KV_LAYOUT)
    if layout != KV_LAYOUT:
        raise ManifestError(
            f"{where}: kv_cache.layout {_short(layout)} is not supported (expected {KV_LAYOUT!r})"
        )
    kv_dtype = kv.get("dtype")
    if not isinstance(kv_dtype, str) or kv_dtype not in KV_DTYPES:
        raise ManifestError(
            f"{where}: kv_cache.dtype {_short(kv_dtype)} is not one of {', '.join(KV_DTYPES)}"
        )

    io = _io_spec(_optional_section(raw, "io", where), where)
    files = raw.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{where} lists no files. Re-export the model.")
    for rel, entry in files.items():
        _check_relative(rel, where)
        _check_file_entry(rel, entry, where)

    graph = _optional_section(raw, "graph", where)
    graph_file = graph.get("file", LEGACY_GRAPH_FILE)
    _check_relative(graph_file, where)
    if graph_file not in files:
        raise ManifestError(
            f"{where}: the graph {_short(graph_file)} is not among its files. Re-export the model."
        )
    return Manifest(
        folder=folder,
        format_version=version,
        model=model,
        io=io,
        kv_dtype=kv_dtype,
        quant=_optional_section(raw, "quant", where),
        source=_optional_section(raw, "source", where),
        files=files,
        tools=_optional_section(raw, "tools", where),
        graph=graph,
        graph_file=graph_file,
    )


def verify_files(folder: Path, files: dict[str, dict[str, Any]], names: Iterable[str] | None = None) -> None:
    """Raises ManifestError naming the first listed file that is missing or differs from its checksum.
    `names`: only these entries (default: all)."""
    paths = check_listed_files(folder, files, names)
    for rel, path in paths.items():
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise ManifestError(
                f"export folder {folder}: cannot read {rel} ({exc.strerror or exc})"
            ) from None
        if actual != files[rel]["sha256"]:
            raise ManifestError(
                f"export folder {folder} is damaged: {rel} sha256 mismatch "
                f"(expected {files[rel]['sha256']}, got {actual}). Re-export it."
            )


def check_listed_files(
    folder: Path, files: dict[str, dict[str, Any]], names: Iterable[str] | None = None
) -> dict[str, Path]:
    """The listed files' paths, each checked to be a regular file inside the folder of the listed size; the
    size check is free and catches truncated copies before anything spends time on a multi-GB hash."""
    root = folder.resolve()
    paths = {rel: _listed_path(folder, root, rel) for rel in (files if names is None else names)}
    for rel, path in paths.items():
        expected_bytes = files[rel].get("bytes")
        actual_bytes = path.stat().st_size
        if expected_bytes is not None and actual_bytes != expected_bytes:
            raise ManifestError(
                f"export folder {folder} is damaged: {rel} size mismatch "
                f"(expected {expected_bytes} bytes, got {actual_bytes}). Re-export it."
            )
    return paths


def _listed_path(folder: Path, root: Path, rel: str) -> Path:
    """The file a manifest entry names, refused unless it is a regular file inside the folder: an entry that
    is a link to a file elsewhere (a hostile download) is never followed, read or hashed."""
    path = folder / rel
    try:
        if not path.is_file():
            raise ManifestError(f"export folder {folder} is incomplete: {rel} is missing. Re-export it.")
        inside = path.resolve().is_relative_to(root)
    except OSError as exc:  # a name too long, a folder that cannot be read
        raise ManifestError(f"export folder {folder}: cannot read {rel} ({exc.strerror or exc})") from None
    if not inside:
        raise ManifestError(
            f"export folder {folder}: {rel} is a link to a file outside the folder; refusing it"
        )
    return path


# Upper bounds far above any model this runtime can run, so that a damaged value fails here, not after
# minutes of allocating (a num_layers of 10^8 made 2 * 10^8 input names).
_MODEL_INTS = {
    "num_layers": 4096,
    "num_attention_heads": 4096,
    "num_kv_heads": 4096,
    "head_dim": 65536,
    "hidden_size": 1 << 20,
    "vocab_size": 1 << 24,
    "context_length": 1 << 24,
}
MAX_MANIFEST_BYTES = 16 << 20
SHA256 = re.compile(r"^[0-9a-f]{64}$")
IO_TEMPLATES = ("past_key", "past_value", "present_key", "present_value")


def _io_spec(io_raw: dict[str, Any], where: Path) -> IOSpec:
    # Missing name templates fall back to the documented defaults; an export always writes them anyway.
    templates = {}
    for key in IO_TEMPLATES:
        if key not in io_raw:
            continue
        value = io_raw[key]
        # Exactly one "{i}" and no other braces: the name is filled in with str.format for each layer.
        if not isinstance(value, str) or value.count("{i}") != 1 or set("{}") & set(value.replace("{i}", "")):
            raise ManifestError(f"{where}: io.{key} must be a name with one '{{i}}', got {_short(value)}")
        templates[key] = value
    names = {}
    for key in ("inputs", "outputs"):
        value = io_raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ManifestError(f"{where}: io.{key} must be a list of names, got {_short(value)}")
        names[key] = tuple(value)
    return IOSpec(**names, **templates)


def _check_file_entry(rel: str, entry: Any, where: Path) -> None:
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("sha256"), str)
        or not SHA256.match(entry["sha256"])
    ):
        raise ManifestError(f"{where}: files[{rel!r}] has no valid sha256. Re-export the model.")
    size = entry.get("bytes")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ManifestError(
            f"{where}: files[{rel!r}].bytes must be a whole number of bytes, got {_short(size)}"
        )


def _section(raw: dict[str, Any], name: str, where: Path) -> dict[str, Any]:
    value = raw.get(name)
    if not isinstance(value, dict):
        raise ManifestError(f"{where} has no {name!r} section. Re-export the model.")
    return value


def _optional_section(raw: dict[str, Any], name: str, where: Path) -> dict[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: {name!r} must be an object, got {_short(value)}. Re-export the model.")
    return dict(value)


def _key(section: dict[str, Any], name: str, prefix: str, where: Path) -> Any:
    if name not in section:
        raise ManifestError(f"{where} is missing {prefix}.{name}. Re-export the model.")
    return section[name]


def _int(section: dict[str, Any], name: str, prefix: str, where: Path, high: int) -> int:
    value = _key(section, name, prefix, where)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= high:
        raise ManifestError(
            f"{where}: {prefix}.{name} must be an integer from 1 to {high}, got {_short(value)}"
        )
    return value


def _short(value: Any) -> str:
    """A value as it goes into a message: repr, cut short (a manifest may hold anything)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_relative(rel: Any, where: Path) -> None:
    # A manifest must not point outside its own folder (it may come from an untrusted download).
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ManifestError(f"{where} lists a file outside the export folder: {_short(rel)}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ManifestError(f"{where} lists a file outside the export folder: {_short(rel)}")
