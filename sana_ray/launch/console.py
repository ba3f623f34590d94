"""The driver's console output (rich markup; plain text when not a terminal)."""

from __future__ import annotations

from rich.console import Console

from sana_ray.redaction import redact_text

console = Console(highlight=False)


def say(message: str) -> None:
    """One line for the operator; secrets in it (a URI with a password, a token) are masked."""
    console.print(redact_text(message))
