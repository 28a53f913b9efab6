"""Checks local `{split}.jsonl` files before `datasets` reads them.

`datasets`' JSON loader reports a bad line as a pyarrow error without file or line; users need both.

Lines are the pieces between "\\n" bytes, exactly as JSON Lines and the pyarrow reader split them, so line
numbers match what an editor shows: the file is read as bytes (text mode would also split at a lone "\\r",
`str.splitlines` at U+2028, U+0085, form feeds, ... which JSON strings may hold unescaped) and each line is
decoded as strict UTF-8, so an invalid byte is reported with its line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a UTF-8 file, split at "\\n" only (a "\\r" before it is dropped);
    invalid UTF-8 or an unreadable file raises `UserError` naming the file (and the line)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror})") from None
    pieces = data.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()  # the newline that ends the last line does not start another
    for line_number, raw in enumerate(pieces, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"{path}:{line_number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                            f"{error.start + 1}: {error.reason})") from None
        yield line_number, text.removesuffix("\r")


def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) of every non-blank line; `UserError` with file and line otherwise."""
    for line_number, line in read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{line_number}: malformed JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        yield line_number, record


def check_jsonl(path: Path, columns: tuple[str, ...], required_text: tuple[str, ...] = (),
                empty: str = "split is empty") -> int:
    """Return the number of rows; raise `UserError` naming file and line for anything unreadable.

    Every column must be text on every row; each column of `required_text` must also be non-blank on at least
    one row: a column empty everywhere would train (or score) on nothing but padding, without a word. `empty`:
    what the error says of a file without rows.
    """
    rows = 0
    with_text = dict.fromkeys(required_text, 0)
    for line_number, record in read_records(path):
        for column in columns:
            try:
                value = get_field(record, column)
            except KeyError:
                raise UserError(f"{path}:{line_number}: missing column {column!r}") from None
            if not isinstance(value, str):
                raise UserError(f"{path}:{line_number}: column {column!r} is {type(value).__name__}, "
                                "expected text")
            if column in with_text and value.strip():
                with_text[column] += 1
        rows += 1
    if rows == 0:
        raise UserError(f"{path}: {empty}")
    for column, count in with_text.items():
        if count == 0:
            raise UserError(f"{path}: column {column!r} is empty on every row ({rows} rows); nothing to learn "
                            "from or score against")
    return rows
