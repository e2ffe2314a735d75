"""Errors caused by the user's input: the CLI prints them as one clear message, no traceback."""

from manifests.errors import UserError

__all__ = ["UserError"]
