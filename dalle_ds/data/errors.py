"""The one exception for a sample that is skipped rather than trained on."""

from __future__ import annotations


class Rejected(Exception):
    """A sample was skipped. ``reason`` is a short snake_case key (e.g. "corrupt_image") under which
    skips are counted, so it must stay stable; ``detail`` is free text for the log."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason
