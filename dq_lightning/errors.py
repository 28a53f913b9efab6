"""User-facing errors.

A `UserError` is a mistake in the user's input (a config value, a file, a flag). The command line prints
it as one line naming the culprit and exits non-zero without a traceback; anything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """Bad user input; the message names the file, field or flag at fault."""
