"""Export folders: built in a staging folder beside the target, checksummed, then moved into place.

A folder either is complete, with a manifest (`smolexport.json`) holding the sha256 of every file, or does
not exist: an interrupted export leaves only a hidden staging folder, which is removed on failure. An export
killed outright (kill -9, a power cut) cannot remove its own: each staging folder has a lock file beside it,
held (flock) for the export's lifetime and released by the system when the process dies, so a later export
into the same parent folder removes the staging folders whose lock nobody holds, and says so, and never one
of an export still running.
Reading and verifying a manifest is the runtime's job (`smolexport_runtime.manifest`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from smolexport_runtime.manifest import sha256_file

from .errors import SmolexportError
from .progress import SILENT, Progress

try:  # POSIX: the lock that tells a live export's staging folder from a dead one's
    import fcntl
except ImportError:  # Windows: stale staging folders are left for the user to delete
    fcntl = None

MANIFEST = "smolexport.json"


def file_inventory(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `folder` except the manifest, keyed by relative path."""
    inventory = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            inventory[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return inventory


def model_manifest(config, context_length: int) -> dict[str, Any]:
    """The manifest's "model" section (shapes a runtime needs), the same for every export format."""
    c = config
    return {
        "architecture": "llama",
        "num_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "context_length": context_length,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rope_theta": c.rope_theta,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = {**manifest, "files": file_inventory(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _lock_path(staging: Path) -> Path:
    return staging.with_name(staging.name + ".lock")


def _hold_lock(staging: Path):
    """Opens and locks the staging folder's lock file; the open file keeps the lock until closed or death."""
    if fcntl is None:
        return None
    handle = open(_lock_path(staging), "w")  # noqa: SIM115  # held for the export's lifetime
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def remove_stale_staging(parent: Path) -> list[Path]:
    """Removes the staging folders in `parent` whose export is no longer running (nobody holds their lock)."""
    if fcntl is None or not parent.is_dir():
        return []
    removed = []
    for lock_path in sorted(parent.glob(".*.partial-*.lock")):
        staging = lock_path.with_name(lock_path.name[: -len(".lock")])
        try:
            with open(lock_path, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its export runs
                shutil.rmtree(staging, ignore_errors=True)
                lock_path.unlink(missing_ok=True)
        except OSError:
            continue
        removed.append(staging)
    for lock_path in parent.glob(".*.export-lock"):  # the output locks of dead exports (see _hold_output_lock)
        try:
            with open(lock_path, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                lock_path.unlink(missing_ok=True)
        except OSError:
            continue
    return removed


def check_output_path(output: Path, force: bool) -> None:
    try:
        _check_output_path(output, force)
    except OSError as exc:  # a folder that cannot be read
        raise _write_error(output, exc) from None


def _check_output_path(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise SmolexportError(f"{output} already exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise SmolexportError(f"{output} exists and is not a folder")
    if output.exists() and any(output.iterdir()) and not (output / MANIFEST).is_file():
        # --force replaces an earlier export, never an unrelated folder (`--output ~/models --force`).
        raise SmolexportError(f"{output} is not empty and not a smolexport export; refusing to replace it")
    for ancestor in output.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise SmolexportError(f"cannot create {output}: {ancestor} is a file, not a folder")
            break


def _hold_output_lock(output: Path):
    """One export at a time into one output folder: a second one fails at once instead of both running for
    minutes and the later silently replacing the first."""
    if fcntl is None:
        return None
    path = output.with_name(f".{output.name}.export-lock")
    while True:
        handle = open(path, "a")  # noqa: SIM115  # held for the export's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise SmolexportError(f"another export into {output} is running; wait for it to finish") from None
        # The file may have been unlinked (a finishing export, the stale-lock sweep) between open and flock:
        # a lock on an orphan excludes nobody, so lock the file that is there now.
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()


def _release_output_lock(output: Path, handle) -> None:
    if handle is not None:
        output.with_name(f".{output.name}.export-lock").unlink(missing_ok=True)
        handle.close()


def _write_error(output: Path, exc: OSError) -> SmolexportError:
    """A failed file operation (a full disk, no permission) as one line; the staging folder is gone by then."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return SmolexportError(f"no space left to write {output}{where}: free some disk space and export again")
    return SmolexportError(f"export to {output} failed: {exc.strerror or exc}{where}")


@contextmanager
def staged_output(output: Path, force: bool, progress: Progress = SILENT) -> Iterator[Path]:
    """Yields an empty staging folder; on success it replaces `output`, on failure it is deleted."""
    output = Path(output).absolute()
    check_output_path(output, force)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output_lock = _hold_output_lock(output)
    except OSError as exc:
        raise _write_error(output, exc) from None
    try:
        check_output_path(output, force)  # again: another export may have finished while we waited
        for stale in remove_stale_staging(output.parent):
            progress.step(f"removed {stale}, the staging folder of an export that is no longer running")
        with _staging_folder(output) as staging:
            yield staging
            if output.exists() and not force:  # made by something else while this export ran
                raise SmolexportError(f"{output} appeared while exporting; pass --force to replace it")
            _move_into_place(staging, output)
    except OSError as exc:
        raise _write_error(output, exc) from None
    finally:
        _release_output_lock(output, output_lock)


@contextmanager
def _staging_folder(output: Path) -> Iterator[Path]:
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    lock = _hold_lock(staging)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the export should not be
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if lock is not None:
            _lock_path(staging).unlink(missing_ok=True)
            lock.close()


def _move_into_place(staging: Path, output: Path) -> None:
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, old / output.name)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)
