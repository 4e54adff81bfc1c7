"""User-facing errors: one line, exit code 2, no traceback (the CLI boundary turns them into that)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (recipe, flags, files). Printed as one line; exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep the message on one line whatever the cause's text contained.
        super().__init__(" ".join(str(message).split()))


class RecipeError(UserError):
    """The recipe (file or --set override) is invalid."""
