"""Seeded perturbations of source texts, for the robustness report (`dq_lightning.evaluation.robustness`).

Kinds (`KINDS`):
- `typo`: one letter of a word swapped with its neighbour, dropped, inserted or replaced by another letter;
- `drop`: the word removed (with one whitespace run beside it);
- `swap`: the word and the next word exchanged, within a sentence (not across `.`/`!`/`?` or a line break),
  their punctuation left in place;
- `number`: one digit of a word holding digits replaced by another digit.

What `rate` means: a *word* is a whitespace-separated piece of the text holding a letter or a digit (a lone
"-" is not one). A text of n words gets `round(rate * n)` of them perturbed (halves round up), each by one
kind drawn uniformly by the RNG among the requested kinds that apply to it (a word without digits takes no
`number`, a one-letter word no letter drop, ...). Words are visited in a random order and each is perturbed
at most once; a swap moves two words and counts as both, so it is only drawn while two words remain in the
budget. When fewer words can take any requested kind (`number` alone on a text with few numbers), every
word that can is perturbed: `Perturbed.changed` says how many were, `Perturbed.words` out of how many.

Deterministic for (text, seed, index, rate, kinds): each example has its own `random.Random`, seeded from
the seed and the example's index in its split, so the result does not depend on batching or order; the
order in which kinds are listed does not matter. Rate 0 returns the text unchanged.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from dq_lightning.errors import UserError

KINDS = ("typo", "drop", "swap", "number")
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")
_PUNCTUATED = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)  # leading punctuation, the word, trailing punctuation


@dataclass(frozen=True)
class Perturbed:
    text: str
    words: int  # words in the original text
    changed: int  # words perturbed (a swap counts both words)
    edits: tuple[tuple[int, str], ...]  # (word number, kind) of every perturbed word, in the order applied


def check_rate(rate: float, flag: str = "--rate", make_variable: str | None = None) -> float:
    if not 0.0 <= rate <= 1.0:  # also refuses NaN
        make = f" (make: {make_variable})" if make_variable else ""
        raise UserError(f"{flag} {rate:g}{make}: a perturbation rate is a share of words, in [0, 1]")
    return rate


def parse_kinds(value: str, flag: str = "--kinds") -> tuple[str, ...]:
    """The kinds of a comma-separated list, in `KINDS` order (so the result never depends on how they were
    listed); an unknown or empty list is refused naming `flag`."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in KINDS]
    if unknown or not names:
        what = f"unknown kind {unknown[0]!r}" if unknown else "no kind given"
        raise UserError(f"{flag} {value}: {what}; choose from {','.join(KINDS)}")
    return tuple(kind for kind in KINDS if kind in names)


def budget(words: int, rate: float) -> int:
    """Words a text of `words` words gets perturbed at `rate` (halves round up, unlike Python's round)."""
    return int(rate * words + 0.5)


def perturb(text: str, rate: float, seed: int = 0, index: int = 0, kinds: tuple[str, ...] = KINDS) -> Perturbed:
    """`text` with `budget(words, rate)` of its words perturbed (see the module docstring)."""
    kinds = tuple(kind for kind in KINDS if kind in kinds)
    pieces = re.split(r"(\s+)", text)  # words at even positions, whitespace runs at odd ones
    word_at = [position for position in range(0, len(pieces), 2) if _is_word(pieces[position])]
    wanted = budget(len(word_at), check_rate(rate, "rate"))
    if wanted == 0:
        return Perturbed(text, len(word_at), 0, ())
    rng = random.Random(f"{seed}:{index}")
    number_of = {position: number for number, position in enumerate(word_at)}
    touched: set[int] = set()
    edits: list[tuple[int, str]] = []
    for position in rng.sample(word_at, len(word_at)):
        if len(touched) >= wanted:
            break
        if position in touched:
            continue
        partner = _swap_partner(pieces, position, touched) if wanted - len(touched) >= 2 else None
        applicable = [kind for kind in kinds if _applies(kind, pieces[position], partner)]
        if not applicable:
            continue
        kind = rng.choice(applicable)
        moved = [position, partner] if kind == "swap" else [position]
        _apply(kind, pieces, position, partner, rng)
        touched.update(moved)
        edits.extend((number_of[p], kind) for p in moved)
    return Perturbed(_join(pieces), len(word_at), len(touched), tuple(edits))


def perturb_texts(texts: list[str], rate: float, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                  start: int = 0) -> list[Perturbed]:
    """`perturb` of each text, the i-th seeded as example `start + i` of its split."""
    return [perturb(text, rate, seed, start + i, kinds) for i, text in enumerate(texts)]


def _is_word(piece: str | None) -> bool:
    return piece is not None and any(char.isalnum() for char in piece)


def _swap_partner(pieces: list, position: int, touched: set[int]) -> int | None:
    """The next word, when it follows in the same sentence, is untouched and differs (else nothing moves)."""
    after = position + 2
    if after >= len(pieces) or after in touched or not _is_word(pieces[after]):
        return None
    if "\n" in pieces[position + 1] or _SENTENCE_END.search(pieces[position]):
        return None
    return after if _core(pieces[after]) != _core(pieces[position]) else None


def _core(word: str) -> str:
    return _PUNCTUATED.match(word).group(2)


def _swap_cores(first: str, second: str) -> tuple[str, str]:
    """The two words exchanged, their punctuation left in place ("small heads." -> "heads small.")."""
    (lead1, core1, trail1), (lead2, core2, trail2) = (_PUNCTUATED.match(word).groups() for word in (first, second))
    return lead1 + core2 + trail1, lead2 + core1 + trail2


def _applies(kind: str, word: str, partner: int | None) -> bool:
    if kind == "typo":
        return any(char.isalpha() for char in word)
    if kind == "number":
        return any(char.isdigit() for char in word)
    if kind == "swap":
        return partner is not None
    return True  # drop


def _apply(kind: str, pieces: list, position: int, partner: int | None, rng: random.Random) -> None:
    if kind == "drop":
        pieces[position] = None
    elif kind == "swap":
        pieces[position], pieces[partner] = _swap_cores(pieces[position], pieces[partner])
    elif kind == "number":
        pieces[position] = _change_digit(pieces[position], rng)
    else:
        pieces[position] = _typo(pieces[position], rng)


def _change_digit(word: str, rng: random.Random) -> str:
    at = rng.choice([i for i, char in enumerate(word) if char.isdigit()])
    return word[:at] + rng.choice(string.digits.replace(word[at], "")) + word[at + 1:]


def _other_letter(letter: str, rng: random.Random) -> str:
    alphabet = string.ascii_uppercase if letter.isupper() else string.ascii_lowercase
    return rng.choice(alphabet.replace(letter, ""))


def _typo(word: str, rng: random.Random) -> str:
    """One letter operation that changes `word` and leaves it a word: swaps only of two different adjacent
    letters, drops only while another letter remains."""
    letters = [i for i, char in enumerate(word) if char.isalpha()]
    swaps = [i for i in letters if i + 1 < len(word) and word[i + 1].isalpha() and word[i] != word[i + 1]]
    operations = ["insert", "replace"] + (["swap"] if swaps else []) + (["drop"] if len(letters) > 1 else [])
    operation = rng.choice(operations)
    if operation == "swap":
        at = rng.choice(swaps)
        return word[:at] + word[at + 1] + word[at] + word[at + 2:]
    at = rng.choice(letters)
    if operation == "drop":
        return word[:at] + word[at + 1:]
    if operation == "replace":
        return word[:at] + _other_letter(word[at], rng) + word[at + 1:]
    return word[:at] + rng.choice(string.ascii_lowercase) + word[at:]


def _join(pieces: list) -> str:
    """The text again; a dropped word takes the whitespace run before it (after it, for a first word)."""
    pieces = list(pieces)
    for position in range(0, len(pieces), 2):
        if pieces[position] is not None:
            continue
        before, after = position - 1, position + 1
        if before >= 0 and pieces[before] is not None:
            pieces[before] = None
        elif after < len(pieces):
            pieces[after] = None
    return "".join(piece for piece in pieces if piece is not None)
