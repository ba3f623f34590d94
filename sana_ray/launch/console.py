"""The driver's console output (rich markup; plain text when not a terminal)."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False)


def say(message: str) -> None:
    console.print(message)
