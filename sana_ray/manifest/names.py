"""The rule for names that become folders and MLflow names (metadata.name, datasets' names)."""

from __future__ import annotations

import re

# Like a Kubernetes name: safe as a folder name on every filesystem (no case collisions, no '.'
# or '..'), as an MLflow run name and inside a metric name (eval_loss/<dataset>).
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
NAME_RULE = "lower-case letters, digits, '.', '_' and '-', starting and ending with a letter or digit, at most 63 characters"


def suggest_name(value: str) -> str | None:
    """A valid name close to ``value`` (for the error message), or None."""
    name = re.sub(r"[^a-z0-9._-]+", "-", value.lower())[:63].strip("._-")
    return name if re.fullmatch(NAME_PATTERN, name) else None
