"""Checks local `{split}.jsonl` files before `datasets` reads them.

`datasets`' JSON loader reports a bad line as a pyarrow error without file or line; users need both.
"""

from __future__ import annotations

import json
from pathlib import Path

from dq_lightning.errors import UserError


def get_field(record: dict, column: str):
    """`record[column]`, where a dotted column reads a nested field ("translation.en")."""
    value = record
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(column)
        value = value[part]
    return value


def check_jsonl(path: Path, columns: tuple[str, ...]) -> int:
    """Return the number of rows; raise `UserError` naming file and line for anything unreadable."""
    rows = 0
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line_number}: malformed JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            for column in columns:
                try:
                    value = get_field(record, column)
                except KeyError:
                    raise UserError(f"{path}:{line_number}: missing column {column!r}") from None
                if not isinstance(value, str):
                    raise UserError(f"{path}:{line_number}: column {column!r} is {type(value).__name__}, "
                                    "expected text")
            rows += 1
    if rows == 0:
        raise UserError(f"{path}: split is empty")
    return rows
