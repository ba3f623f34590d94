"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The one helper the whole project writes its records with (run state, run.json, cache indexes,
checksum records, checkpoints' state, exports). Each write goes to ``<name>.<pid>.tmp`` beside
the target, is flushed and fsync'ed, then ``os.replace``d over it (atomic on POSIX within one
file system). The pid in the temporary name lets a later build tell a dead writer's leftover from
a live one's (``data.cache.store.remove_stale_temps``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """``<dir>/<name>.<pid>.tmp``: where ``atomic_write`` stages ``path``."""
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


def atomic_write(path: Path | str, data: bytes | str, *, fsync: bool = True) -> Path:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` atomically; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    tmp = temp_path(path)
    with open(tmp, "wb") as handle:
        handle.write(blob)
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: Path | str, data: Any, *, indent: int | None = 2) -> Path:
    return atomic_write(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def write_text_atomic(path: Path | str, text: str) -> Path:
    return atomic_write(path, text)


def read_json(path: Path | str) -> dict:
    """A JSON object from ``path``, or ``{}`` when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the folder ``tmp`` to ``final``; a previous ``final`` is kept until the new one is in place."""
    previous = None
    if final.exists():
        previous = final.with_name(f".{final.name}.previous-{time.time_ns()}")
        final.rename(previous)
    tmp.rename(final)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
