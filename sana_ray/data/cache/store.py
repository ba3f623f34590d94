"""The cache's files: shard format, folder index, checksums, keys. No torch, no Ray.

A cache folder (``latents/<key>/`` or ``text/<key>/``) holds::

    shard_00000.safetensors          tensors plus metadata {"items": [...], "failed": {...}, "format"}
    shard_00000.safetensors.sha256   {"sha256", "size"} of the whole shard file
    ...
    index.json                       written last (atomically): the folder is complete

Shards are plain safetensors files (written by ``safetensors.torch.save``), so any tool can read
them. Training workers do not load them whole: they read single rows at the byte ranges the
file's header gives (``read_header``), so a worker's memory does not grow with the dataset. The
safetensors format is an 8-byte little-endian header length, a JSON header mapping each tensor
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (relative to the end of the header) plus
an optional ``"__metadata__"`` of strings, then the tensors' bytes. The safetensors package reads
tensors but does not expose those offsets, hence the small parser here; it applies the library's
own rule that the tensors must cover the data section exactly (a truncated or padded file fails).

A shard counts as finished only when its file matches its checksum record: the record is put in
place before the shard is renamed into place, so a kill between the two leaves a shard that is
missing or old, redone by the next build.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sana_ray.files import TMP_SUFFIX, temp_path, write_json_atomic

CACHE_FORMAT = 1
INDEX_FILE = "index.json"
KEY_LENGTH = 24  # hex characters of the sha256 used as the folder name
CHECKSUM_SUFFIX = ".sha256"  # shard_XXXXX.safetensors.sha256: {"sha256": hex of the file, "size": bytes}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

# safetensors dtype names -> bytes per element
ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ShardError(ValueError):
    """A shard file that is not a well-formed safetensors file (truncated, padded, foreign)."""


def digest(material: Any) -> str:
    """The folder key of whatever produced a cache folder (a JSON-able description)."""
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


# --------------------------------------------------------------------------------------------
# The shard header


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name: F32, BF16, I64, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the tensor's data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    def items(self) -> list | None:
        """The shard's items (captions or image paths) as the writer recorded them."""
        return json.loads(self.metadata["items"]) if "items" in self.metadata else None

    def failed(self) -> dict[str, str]:
        """Rows whose image could not be decoded, with why (latent shards)."""
        return json.loads(self.metadata.get("failed", "{}"))


def read_header(path: Path) -> ShardHeader:
    """Parse a safetensors file's header (only the header is read). Raises ShardError when the
    file is not well formed, FileNotFoundError when it is missing."""
    size = os.stat(path).st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ShardError(f"{size} bytes: too short for a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ShardError(f"header length {length} exceeds the file ({size} bytes)")
        try:
            raw = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError) as error:
            raise ShardError(f"header is not JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ShardError("header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    data_start = 8 + length
    tensors: dict[str, TensorInfo] = {}
    spans = []
    try:
        for name, info in raw.items():
            begin, end = (int(x) for x in info["data_offsets"])
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            if dtype not in ITEM_SIZE or end - begin != math.prod(shape) * ITEM_SIZE[dtype]:
                raise ShardError(f"tensor {name}: {dtype} {list(shape)} does not match its {end - begin} bytes")
            tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
            spans.append((begin, end))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, ShardError):
            raise
        raise ShardError(f"malformed tensor entry ({type(error).__name__}: {error})") from None
    # safetensors' rule: the tensors cover the data section exactly, without gaps or overlaps.
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise ShardError(f"tensor data does not cover the file contiguously (gap or overlap at byte {begin})")
        position = end
    if data_start + position != size:
        raise ShardError(f"{size} bytes where the header describes {data_start + position} (truncated or appended to)")
    return ShardHeader(tensors, {str(k): str(v) for k, v in metadata.items()})


# --------------------------------------------------------------------------------------------
# Checksums


def checksum_path(shard: Path) -> Path:
    return shard.with_name(shard.name + CHECKSUM_SUFFIX)


def read_checksum(shard: Path) -> dict | None:
    """A shard's recorded {"sha256", "size"}, or None when there is none (an older build) or it is unreadable."""
    try:
        record = json.loads(checksum_path(shard).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) or not isinstance(record.get("size"), int):
        return None
    return record


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_shard(path: Path, blob: bytes, *, before_rename=None) -> None:
    """Put a finished shard (its whole file's bytes) in place: the bytes go to a temporary file,
    the checksum record is put in place, then the shard is renamed into place (see the module
    docstring). ``before_rename``: called in between (the tests' hold point)."""
    tmp = temp_path(path)
    with open(tmp, "wb") as handle:
        handle.write(blob)
        handle.flush()
        os.fsync(handle.fileno())
    write_json_atomic(checksum_path(path), {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}, indent=None)
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Checking a shard


@dataclass
class ShardCheck:
    """What a build found when it checked one shard file."""

    header: ShardHeader | None  # set when the shard is good
    problem: str | None = None  # why a present shard is damaged (it is rebuilt)
    adopted: bool = False  # it had no checksum (an older build): re-verified, and its checksum recorded now
    size: int = 0  # bytes hashed


def verify_shard(path: Path, items: list[str], *, full: bool = True) -> ShardCheck:
    """Check a shard against its checksum record: size always, sha256 of the whole file when ``full``.

    Absent or stale (other items): ``header`` None, no problem (simply (re)encoded). Damaged (size
    or sha256 differs from the record, or the header does not parse): ``problem`` says how. No
    record (an older build): well formed with the right items -> adopted, its record written now.
    """
    try:
        size = path.stat().st_size
    except OSError:
        return ShardCheck(None)
    record = read_checksum(path)
    if record is not None and size != record["size"]:
        return ShardCheck(None, f"{size} bytes where {record['size']} were written (truncated or overwritten)")
    try:
        header = read_header(path)
    except (OSError, ShardError) as error:
        return ShardCheck(None, f"unreadable ({type(error).__name__}: {str(error)[:200]})")
    try:
        if header.items() != items:
            return ShardCheck(None)  # another build's layout: re-encoded
    except ValueError:
        return ShardCheck(None, "unreadable (its items metadata is not JSON)")
    if record is None:
        # An older build's shard: it parses, its sizes add up, its items match; record it from now on.
        write_json_atomic(checksum_path(path), {"sha256": file_sha256(path), "size": size}, indent=None)
        return ShardCheck(header, adopted=True, size=size)
    if full and file_sha256(path) != record["sha256"]:
        return ShardCheck(None, "sha256 differs from the one recorded when it was written (damaged data)")
    return ShardCheck(header, size=size if full else 0)


# --------------------------------------------------------------------------------------------
# The folder index


def read_index(folder: Path, kind: str) -> dict | None:
    """A folder's index.json when it is one of ours of this kind, else None."""
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT or index.get("kind") != kind:
        return None
    return index


def write_index(folder: Path, index: dict) -> None:
    write_json_atomic(folder / INDEX_FILE, index, indent=1)


# --------------------------------------------------------------------------------------------
# Leftovers of killed writers


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: a killed process whose parent has not reaped it yet is a zombie
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove ``<name>.<pid>.tmp`` files (``files.temp_path``) whose writer is no longer running on
    this machine (a killed build's half-written shard or record). A live pid's file is left alone:
    it may be another build on this machine finishing a redundant copy."""
    removed = []
    for path in folder.glob("*" + TMP_SUFFIX):
        pid = path.name.rsplit(".", 2)[-2] if path.name.count(".") >= 2 else ""
        if pid.isdigit() and pid_alive(int(pid)):
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:  # its writer renamed it meanwhile
            pass
    return removed


__all__ = [
    "CACHE_FORMAT", "CHECKSUM_SUFFIX", "INDEX_FILE", "ITEM_SIZE", "KEY_LENGTH", "ShardCheck", "ShardError", "ShardHeader",
    "TensorInfo", "checksum_path", "digest", "file_sha256", "pid_alive", "read_checksum", "read_header", "read_index",
    "remove_stale_temps", "shard_name", "temp_path", "verify_shard", "write_index", "write_shard",
]
