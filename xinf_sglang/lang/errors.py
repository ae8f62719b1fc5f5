"""Errors of the frontend language."""

from __future__ import annotations


class LangError(ValueError):
    """A program, expression or backend argument that cannot be run as written; the message says what is allowed."""


class ProgramError(RuntimeError):
    """A program failed while running (a backend request was refused, the program function raised, ...).

    ``state`` is the program's state as far as it got (its text up to the failure)."""

    def __init__(self, message: str, state: object = None) -> None:
        super().__init__(message)
        self.state = state
