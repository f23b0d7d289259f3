"""Prompt cache files: a prefix's keys and values on disk (see Conversation.save_prefix / warm_start).

The file is an uncompressed `.npz` (a zip of `.npy` arrays): `meta` (JSON: format, the export's weight
checksums, cache dtype and shape) first, then `tokens`, then one `kv_{i}` per key and value. A file is read
in that order and refused at the first thing that is wrong, before the large arrays are read: a file saved
for another export costs a few bytes of reading, and a compressed member (which this runtime never writes,
and which could inflate a small file into gigabytes) is refused without being decompressed.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SmolexportRuntimeError

PROMPT_CACHE_FORMAT = "smolexport-prompt-cache"
PROMPT_CACHE_VERSION = 1
META_MEMBER = "meta.npy"
MAX_META_BYTES = 1 << 16
READ_HEADER = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
# One local zip header: signature, then the member name's length at offset 26 and the name at 30.
ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")


class PromptCacheError(SmolexportRuntimeError):
    """A prompt cache file that is damaged, was saved for another export, or is not a prompt cache file."""


def is_prompt_cache_file(path: Path) -> bool:
    """Whether `path` starts as a prompt cache file does (a zip whose first member is `meta.npy`), which
    stays true of a truncated or damaged one: such a file may be overwritten, any other file may not."""
    try:
        with open(path, "rb") as f:
            head = f.read(ZIP_LOCAL_HEADER.size + len(META_MEMBER))
    except OSError:
        return False
    if len(head) < ZIP_LOCAL_HEADER.size + len(META_MEMBER):
        return False
    signature, name_length, _ = ZIP_LOCAL_HEADER.unpack_from(head)
    name = head[ZIP_LOCAL_HEADER.size : ZIP_LOCAL_HEADER.size + name_length]
    if signature != b"PK\x03\x04":
        return False
    return name == META_MEMBER.encode() or _has_our_meta(path)


def _has_our_meta(path: Path) -> bool:
    """Files saved before meta came first hold it as their last member."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(META_MEMBER)
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > MAX_META_BYTES:
                return False
            meta = json.loads(bytes(_array(archive, META_MEMBER, np.uint8)).decode())
    except (OSError, ValueError, KeyError, EOFError, RecursionError, zipfile.BadZipFile, PromptCacheError):
        return False
    return isinstance(meta, dict) and meta.get("format") == PROMPT_CACHE_FORMAT


def refuse_foreign_file(path: Path) -> None:
    """Raises unless `path` is free to write: missing, or a prompt cache file (perhaps stale or damaged).
    `smolexport chat --prompt-cache notes.txt` must never overwrite the user's notes."""
    if path.is_dir():
        raise PromptCacheError(f"{path} is a folder; give a file name for the prompt cache")
    if path.exists() and not is_prompt_cache_file(path):
        raise PromptCacheError(
            f"{path} exists and is not a prompt cache file; refusing to overwrite it (choose another name)"
        )


def write_prompt_cache(path: Path, key: dict[str, Any], ids: list[int], arrays: list[np.ndarray]) -> None:
    refuse_foreign_file(path)
    meta = {"format": PROMPT_CACHE_FORMAT, "format_version": PROMPT_CACHE_VERSION, **key}
    # meta first: it identifies the file (is_prompt_cache_file) and is read before anything else.
    payload = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    payload["tokens"] = np.asarray(ids, dtype=np.int64)
    payload.update({f"kv_{i}": a for i, a in enumerate(arrays)})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and moved into place: a crash never leaves half a cache under the name.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_prompt_cache(path: Path, key: dict[str, Any]) -> tuple[list[int], list[np.ndarray]]:
    """The token ids and [kv_heads, tokens, head_dim] arrays saved in `path`, checked against `key` (this
    export's weights, cache dtype and shape). Raises PromptCacheError for anything else."""
    if not path.is_file():
        raise PromptCacheError(f"no prompt cache file at {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_members(path, archive, key)
    except PromptCacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, RecursionError, zipfile.BadZipFile) as exc:
        raise PromptCacheError(f"{path} is not a readable prompt cache file ({exc}); delete it") from None


def _read_members(path: Path, archive: zipfile.ZipFile, key: dict[str, Any]) -> tuple[list, list]:
    members = {info.filename: info for info in archive.infolist()}
    if any(info.compress_type != zipfile.ZIP_STORED for info in members.values()):
        raise PromptCacheError(f"{path} holds compressed members, which this runtime never writes; delete it")
    if META_MEMBER not in members or members[META_MEMBER].file_size > MAX_META_BYTES:
        raise PromptCacheError(f"{path} is not a prompt cache file this runtime reads; delete it")
    meta = json.loads(bytes(_array(archive, META_MEMBER, np.uint8)).decode())
    if not isinstance(meta, dict) or meta.get("format") != PROMPT_CACHE_FORMAT:
        raise PromptCacheError(f"{path} is not a prompt cache file this runtime reads; delete it")
    if meta.get("format_version") != PROMPT_CACHE_VERSION:
        raise PromptCacheError(f"{path} is a prompt cache file of another format version; delete it")
    for name in ("weights_sha256", "kv_dtype", "kv_shape"):
        if meta.get(name) != key[name]:
            raise PromptCacheError(
                f"{path} was saved for another export ({name} {_short(meta.get(name))}, this export has "
                f"{_short(key[name])}); delete it or save it again with this model"
            )
    layers, heads, head_dim = key["kv_shape"]
    if set(members) != {META_MEMBER, "tokens.npy", *(f"kv_{i}.npy" for i in range(2 * layers))}:
        raise PromptCacheError(f"{path} is damaged (its arrays do not match the export); delete it")
    tokens = _array(archive, "tokens.npy", np.int64, path=path)
    if tokens.ndim != 1 or not len(tokens) or tokens.min() < 0:
        raise PromptCacheError(f"{path} is damaged (its token ids); delete it")
    ids = [int(t) for t in tokens]
    shape, dtype = (heads, len(ids), head_dim), np.dtype(key["kv_dtype"])
    arrays = [_array(archive, f"kv_{i}.npy", dtype, shape, path) for i in range(2 * layers)]
    return ids, arrays


def _array(
    archive: zipfile.ZipFile, name: str, dtype, shape: tuple[int, ...] | None = None, path: Path | None = None
) -> np.ndarray:
    """One member as an array, its header checked before its data is read (allow_pickle stays off)."""
    with archive.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version not in READ_HEADER:
            raise ValueError(f"{name} has .npy format version {version}")
        header = READ_HEADER[version](f)  # (shape, fortran_order, dtype)
        if header[2] != np.dtype(dtype) or header[1] or (shape is not None and header[0] != shape):
            raise PromptCacheError(f"{path} is damaged ({name} does not match the export); delete it")
        count = int(np.prod(header[0], dtype=np.int64))
        data = f.read(count * header[2].itemsize)
    array = np.frombuffer(data, dtype=header[2], count=count)
    return array.reshape(header[0]).copy()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
