"""User-facing errors.

A `UserError` is a mistake in the user's input (a config value, a file, a flag). The command line prints
it as one line naming the culprit and exits non-zero without a traceback; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad user input; the message names the file, field or flag at fault."""

# Not a ValueError on purpose: jsonargparse turns ValueErrors raised while it instantiates a class into a
# multi-line "does not validate against" report that buries the message.
