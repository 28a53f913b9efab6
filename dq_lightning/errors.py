"""User-facing errors.

A `UserError` is a mistake in the user's input (a config value, a file, a flag). The command line prints
it as one line naming the culprit and exits non-zero without a traceback; anything else is a bug and keeps
its traceback.
"""

import functools
import os
import re
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad user input; the message names the file, field or flag at fault."""

# Not a ValueError on purpose: jsonargparse turns ValueErrors raised while it instantiates a class into a
# multi-line "does not validate against" report that buries the message.


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none (for a one-line report)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def find_user_error(error: BaseException | None) -> UserError | None:
    """The `UserError` behind `error`: jsonargparse re-raises errors from a class's __init__ as its own."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def command_line(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """The one boundary between a command's `main(argv) -> int` and the user: a `UserError` (also one that a
    library wrapped in its own exception) becomes a single `error: ...` line on stderr and exit status 2.
    Anything else is a bug and keeps its traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised unless a UserError is behind it
            user_error = find_user_error(error)
            if user_error is None:
                raise
            print(f"error: {user_error}", file=sys.stderr)
            return 2

    return run


def make_variables() -> dict[str, str]:
    """The variables given to `make` on its command line (`make teacher GPUS=2` -> {"GPUS": "2"}), when this
    process runs in a Makefile recipe; else {}.

    The Makefile turns GPUS= or SCALE= into flags and config files the user never typed; an error naming only
    `--trainer.accelerator=gpu` would not tell them what to change. make passes its command-line variables to
    recipes in MAKEFLAGS, after " -- ", with spaces inside a value escaped by a backslash.
    """
    if not os.environ.get("MAKELEVEL"):
        return {}
    flags = os.environ.get("MAKEFLAGS", "")
    _, separator, assignments = flags.partition(" -- ")
    if not separator and flags.startswith("-- "):
        assignments = flags[3:]
    found = {}
    for token in re.split(r"(?<!\\) ", assignments.strip()):
        name, equals, value = token.partition("=")
        if equals and name.isidentifier():
            found[name] = value.replace("\\ ", " ")
    return found
