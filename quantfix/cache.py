"""The shared cache: atomic, checksummed entries keyed by content fingerprints.

Parallel sweep jobs may write the same key at once, so every entry is written to a temporary file
and renamed into place; a sha256 trailer makes a truncated or damaged entry detectable, and
``load_entry`` removes such an entry (with a warning) so that it is recomputed. Keys are built
from content, never from paths: ``model_fingerprint`` hashes a model's files (safetensors headers,
sizes and a sampled hash of the data, tokenizer and config files), so a model overwritten in place
gets new keys and a copied model (or GGUF file) reuses the old ones.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from quantfix.errors import QuantfixError

log = logging.getLogger(__name__)
T = TypeVar("T")

# the format of cache entries and of their keys: bump it when either changes (part of every key)
CACHE_VERSION = 4
_MAGIC = b"\nquantfix-sha256:"
_TRAILER_LEN = len(_MAGIC) + 64 + 1
_SAMPLE = 1 << 20  # bytes per sampled block of a large file
_STRIDED = 8  # sampled blocks between the first and the last MiB
_FULL_MAX = 16 << 20  # files up to this size are hashed whole

# how a full disk (or quota) shows when the writer is not a plain OSError: safetensors' Rust IoError
# ("No space left on device (os error 28)", "StorageFull") and torch's zip writer ("unexpected pos
# 2432 vs 2304": a short write)
_DISK_FULL = re.compile(r"no space left|storagefull|os error 28|disk quota|unexpected pos \d+ vs \d+", re.I)


def is_disk_full(e: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is a full disk or an exceeded quota."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if not isinstance(e, OSError) and _DISK_FULL.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def sha256_file(path: Path) -> str:
    """The sha256 of a whole file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None], checksum: bool = True,
                 setting: str = "cache_dir") -> None:
    """Call write(tmp) on a unique temporary file beside path, append a sha256 trailer (unless
    ``checksum`` is off: a file other programs read), then rename it into place: readers see either
    nothing or a complete file, and concurrent writers never share a temporary file. A full disk is
    one line naming the directory and ``setting``, the key that moves it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(Path(tmp))
        if checksum:
            digest = sha256_file(Path(tmp))
            with open(tmp, "ab") as f:
                f.write(_MAGIC + digest.encode() + b"\n")
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise QuantfixError(f"no space left on device while writing {path.name} to {path.parent}: free space "
                                f"there, or set {setting}=<a directory with room>") from e
        raise


class CorruptEntry(Exception):
    """A cache entry whose checksum is missing or does not match its content."""


def read_verified(path: Path) -> bytes:
    """The content of a file written by ``atomic_write`` with a checksum, trailer removed;
    ``CorruptEntry`` when the trailer is missing (truncated) or does not match."""
    data = Path(path).read_bytes()
    body, trailer = data[:-_TRAILER_LEN], data[-_TRAILER_LEN:]
    if len(data) < _TRAILER_LEN or not trailer.startswith(_MAGIC) or not trailer.endswith(b"\n"):
        raise CorruptEntry("no checksum: truncated, or written by another version")
    if hashlib.sha256(body).hexdigest().encode() != trailer[len(_MAGIC):-1]:
        raise CorruptEntry("checksum mismatch")
    return body


def load_entry(path: Path, parse: Callable[[bytes], T]) -> Optional[T]:
    """The parsed cache entry at ``path``, or None when there is none. An entry that cannot be
    read (checksum, truncation, bad JSON, a torch zip error...) is removed with a warning that
    names it, and None is returned: the caller recomputes it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return parse(read_verified(path))
    except FileNotFoundError:  # a parallel job removed it first
        return None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read it means it is damaged
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        log.warning("cache entry %s is corrupt (%s: %s): removed, recomputing it", path, type(e).__name__, msg)
        path.unlink(missing_ok=True)
        return None


# ------------------------------------------------------------------------------- fingerprints

def digest(obj: Any) -> str:
    """sha256 of a JSON-able value (config sections, key parts), order-independent for dicts."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(t) -> str:
    """sha256 of a CPU tensor's dtype, shape and bytes (token windows, calibration samples)."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """Content hash of one file: its size plus the whole content when small, else the first and
    last MiB and ``_STRIDED`` blocks in between (fast on multi-GB shards); safetensors files add
    their header (every tensor's name, dtype, shape and data offsets)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}|".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n) if 0 < n <= min(size - 8, 1 << 30) else b"bad header")
            f.seek(0)
        if size <= _FULL_MAX:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            last = size - _SAMPLE
            for off in sorted({0, last, *(k * last // (_STRIDED + 1) for k in range(1, _STRIDED + 1))}):
                f.seek(off)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()


def _hub_snapshot(name: str, revision: Optional[str]) -> Optional[Path]:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local hub cache
        return None


def model_fingerprint(name_or_path: str, revision: Optional[str] = None) -> str:
    """Content fingerprint of a model directory: every file's relative name and ``file_digest``
    (weights, config, tokenizer, custom code), hidden files and folders skipped. A hub id is
    fingerprinted through its snapshot folder in the local hub cache (after loading, it is there)."""
    root = Path(name_or_path)
    if not root.is_dir():
        snapshot = _hub_snapshot(name_or_path, revision)
        if snapshot is None:
            log.warning("no local files for %s: its cache entries are keyed by name and revision only", name_or_path)
            return digest(["hub", name_or_path, revision])[:32]
        root = snapshot
    h = hashlib.sha256(b"model-fingerprint-v1")
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        h.update(f"{rel.as_posix()}|{file_digest(f)}\n".encode())
    return h.hexdigest()[:32]


def code_version() -> str:
    """The quantfix version plus a hash of its source files: a resumed run replays a journal only
    when the code that wrote it is the same."""
    import quantfix

    pkg = Path(quantfix.__file__).parent
    h = hashlib.sha256(quantfix.__version__.encode())
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.relative_to(pkg).as_posix().encode())
        h.update(f.read_bytes())
    return f"{quantfix.__version__}+{h.hexdigest()[:12]}"


def cache_dir(configured: Optional[str] = None) -> Path:
    path = Path(configured or os.environ.get("QUANTFIX_CACHE") or Path.home() / ".cache" / "quantfix")
    path.mkdir(parents=True, exist_ok=True)
    return path
