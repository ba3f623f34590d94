"""Where a run may write: output and cache folders outside the system's own folders.

``output.dir: /``, ``/etc`` or a ``../../..`` that climbs out of the project is almost always a
slip, and a run writes many files there (``<dir>/<name>/``, ``<dir>/mlflow.db``, ``<dir>/cache``).
The loader refuses such folders unless ``output.allow_system_dirs: true`` says the user means it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# The filesystem root and the folders the OS owns (Linux FHS; macOS has the same names).
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
               "/sys", "/usr", "/var")
# ... except these, which hold everyone's files.
OPEN_DIRS = ("/var/tmp", "/var/folders")  # /var/folders: macOS's per-user temp folders


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _open_folders() -> list[str]:
    folders = list(OPEN_DIRS)
    for extra in (os.path.expanduser("~"), tempfile.gettempdir()):
        if extra and os.path.isabs(extra) and os.path.normpath(extra) != "/":
            folders.append(os.path.normpath(extra))  # a service account's home may be /var/lib/<name>
    return folders


def system_location(folder: Path | str) -> str | None:
    """Why ``folder`` (absolute) is no place for a run's files, in words; None when it is fine.

    Both the path as written and the path with symlinks resolved are checked.
    """
    candidates = {os.path.normpath(str(folder))}
    try:
        candidates.add(os.path.realpath(folder))
    except (OSError, ValueError):
        pass
    open_folders = _open_folders()
    for path in sorted(candidates):
        if path == "/":
            return "the filesystem root"
        if any(_inside(path, allowed) for allowed in open_folders):
            continue
        for system in SYSTEM_DIRS:
            if _inside(path, system):
                return f"a system folder ({system})"
    return None
