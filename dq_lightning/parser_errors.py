"""The parser's complaints about a command line, as one line naming the flag at fault.

jsonargparse reports a value of the wrong type as the usage of all 60 options followed by the tree of union
subtypes it tried (`Parser key "model": Does not validate against any of the Union subtypes ... Parser key "lr":
Expected a <class 'float'>. Got value: abc`): the flag and the expected type are buried 50 lines down. What the
user needs is the flag as typed, what it expects, and for a misspelt option the nearest real one.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import typing
from collections.abc import Iterable, Sequence

from dq_lightning.compat import moved_setting

_ARTICLES = {"int": "an int", "float": "a float", "bool": "a bool (true or false)", "str": "a string",
             "dict": "a mapping ({key: value, ...})", "list": "a list ([a, b, ...])"}


def explain(message: str, argv: Sequence[str], options: Iterable[str] = ()) -> str:
    """One line for jsonargparse's `message` about `argv` (the subcommand's arguments); `options` are the
    subcommand's option strings, for suggesting the nearest to an unknown one."""
    text = str(message).strip()
    options = sorted({option for option in options if option.startswith("--")})
    unknown = re.match(r"[Uu]nrecognized arguments:\s*(.+)", text)
    if unknown:
        return "; ".join(_unknown_flag(token, options) for token in unknown.group(1).split() if token.startswith("-"))
    missing = re.match(r"argument (--\S+): expected one argument", text)
    if missing:  # `--model.lr` at the end or followed by another flag
        flag = missing.group(1)
        bare = [token for index, token in enumerate(argv)
                if (token == flag or token.startswith(flag + ".")) and "=" not in token
                and (index + 1 == len(argv) or argv[index + 1].startswith("--"))]
        typed = bare[-1] if bare else flag
        return f"{typed}: expected a value ({typed}=VALUE)"
    chain, classes, rejected = _nesting(text)
    if not chain:
        return _one_line(text)
    key = ".".join(chain)
    if rejected:
        return _rejected_option(key, rejected, classes, argv)
    if len(classes) == len(chain):  # the innermost class itself is at fault (cannot be imported, ...)
        reason = _after(text, f"Problem with given class_path '{classes[-1]}':")
        typed = typed_flag(f"{key}.class_path", argv) or typed_flag(key, argv) or f"{key}.class_path"
        return f"{typed}: cannot use class {classes[-1]!r} ({reason})"
    innermost = text[text.rfind(f'Parser key "{chain[-1]}"'):]
    reason = _expected(innermost) or _after(innermost, f'Parser key "{chain[-1]}":')
    value = re.search(r"(?:Got value|Given value): (.*)", innermost)
    typed, inside = _typed_prefix(chain, argv)
    if typed and value is None:  # e.g. `File does not exist: '<the path just named>'`
        reason = re.sub(r": '[^']*'$", "", reason)
    if typed is None:
        given = f"={value.group(1).strip()}" if value and "NestedArg" not in value.group(1) else ""
        return f"{key}{given} (from {config_files(argv) or 'the config'}): {reason}"
    return f"{typed}: {inside + ': ' if inside else ''}{reason}"


def _nesting(text: str) -> tuple[list[str], list[str], str | None]:
    """The keys from the outermost parser to the one at fault (`model`, `quant_settings`, `act_clip`), the
    classes tried on the way, and the option a class refused, if that is the fault. jsonargparse lists the
    configured class first among a union's alternatives, so the first path down the report is the one. A
    settings dataclass (`quant_settings`) is a group of its class's parser, and counts as a class of its own."""
    chain, classes = [], []
    for found in re.finditer(r'Parser key "([^"]+)"|Problem with given class_path \'([^\']+)\':'
                             r"|Option '([^']+)' is not accepted|Group '([^']+)' does not accept option '([^']+)'"
                             r"|unrecognized arguments: --([\w.]+)", text):
        key, class_path, option, group, group_option, dotted = found.groups()
        if key is not None and len(chain) == len(classes):
            chain.append(key)
        elif class_path is not None and len(classes) == len(chain) - 1:
            classes.append(class_path)
        elif len(classes) == len(chain) and classes and (option or group or dotted):
            if option is not None:
                return chain, classes, option
            *groups, option = (group, group_option) if group else dotted.split(".")
            for name in groups:
                chain.append(name)
                classes.append(_parameter_class(classes[-1], name))
            return chain, classes, option
    return chain, classes, None


def _parameter_class(class_path: str, parameter: str) -> str:
    """The dotted path of the class that parameter `parameter` of `class_path` takes ('' when unknown)."""
    try:
        hints = typing.get_type_hints(_import(class_path).__init__)
    except Exception:  # noqa: BLE001 - only for a suggestion
        return ""
    kinds = [kind for kind in typing.get_args(hints.get(parameter)) or [hints.get(parameter)] if inspect.isclass(kind)]
    return next((f"{kind.__module__}.{kind.__qualname__}" for kind in kinds if kind is not type(None)), "")


def _typed_prefix(chain: list[str], argv: Sequence[str]) -> tuple[str | None, str]:
    """The flag of `chain` as typed, or of its nearest parent typed (`--model.quant_settings={...}`) with the
    rest of the key inside it; (None, "") when the value came from a config file."""
    for end in range(len(chain), 0, -1):
        typed = typed_flag(".".join(chain[:end]), argv)
        if typed:
            return typed, ".".join(chain[end:])
    return None, ""


def _rejected_option(key: str, name: str, classes: list[str], argv: Sequence[str]) -> str:
    """An option the innermost class does not have: a moved student setting's new flag (`--model.w_bits` ->
    `--model.bits`), the outer class's own setting of that name (`quant_settings={bits: 2-2-8}` ->
    `--model.bits`), the nearest it has, or all it has when they are few."""
    chain = key.split(".")
    typed, inside = _typed_prefix([*chain, name], argv)
    where = typed or f"{key}.{name} (in a --config file)"
    options = _init_parameters(classes[-1])
    near = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    outer = next((".".join(chain[:depth + 1]) for depth in range(len(classes) - 2, -1, -1)
                  if name in _init_parameters(classes[depth])), None)
    moved = moved_setting(name) if classes[0].endswith(("DQStudentModule", "DQSupernetModule")) else None
    if moved:
        hint = f"; that setting is now {moved}"
    elif outer:
        hint = f"; {name} is a setting of its own: --{outer}.{name}"
    elif near:
        hint = f"; did you mean --{key}.{near[0]}?"
    elif len(options) <= 12:
        hint = f"; its options: {', '.join(options)}"
    else:
        hint = ""
    inside = f"{key}.{name}: " if typed and inside else ""
    return f"{where}: {inside}{classes[-1].rpartition('.')[2]} has no option {name!r}{hint}"


def _unknown_flag(token: str, options: list[str]) -> str:
    name = token.split("=", 1)[0]
    near = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else "; --help lists the options"
    return f"unknown option {token}{hint}"


def typed_flag(key: str, argv: Sequence[str]) -> str | None:
    """`key` as the user typed it on the command line (`--model.lr=abc`, `--model.init_args.lr abc`), or None
    when it came from a config file. The last occurrence wins, as in the parser."""
    head, _, rest = key.partition(".")
    names = {f"--{key}"} | ({f"--{head}.init_args.{rest}"} if rest else set())
    found = None
    for index, token in enumerate(argv):
        token = str(token)
        flag = token.split("=", 1)[0]
        if flag in names:
            if "=" in token or index + 1 >= len(argv):
                found = token
            else:
                found = f"{token} {argv[index + 1]}"
    return found


def config_paths(argv: Sequence[str]) -> list[str]:
    """The `--config` files of `argv`, in order (a later one overrides an earlier one)."""
    files = []
    for index, token in enumerate(argv):
        token = str(token)
        if token in ("--config", "-c") and index + 1 < len(argv):
            files.append(str(argv[index + 1]))
        elif token.startswith("--config="):
            files.append(token.split("=", 1)[1])
    return files


def config_files(argv: Sequence[str]) -> str:
    return ", ".join(f"--config {name}" for name in config_paths(argv))


def _expected(text: str) -> str | None:
    """'expected an int' from the `Expected a <class 'int'>` lines (None and NoneType dropped)."""
    kinds = []
    for found in re.findall(r"Expected an? (.+?)(?:\. Got value:.*)?$", text, flags=re.MULTILINE):
        found = found.strip()
        literal = re.match(r"typing\.Literal\[(.*)\]$", found)
        kind = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", found)
        kind = re.sub(r"^(dict|list)\[.*\]$", r"\1", kind)
        if kind == "NoneType":
            continue
        if literal:
            kinds.append(("literal", literal.group(1)))
        elif kind not in [k for _, k in kinds]:
            kinds.append(("type", kind))
    if not kinds:
        return None
    literals = [value for kind, value in kinds if kind == "literal"]
    types = [_ARTICLES.get(value, f"a {value}") for kind, value in kinds if kind == "type"]
    parts = types + ([f"one of {', '.join(literals)}"] if literals else [])
    return "expected " + " or ".join(parts)


def _after(text: str, marker: str) -> str:
    """The first line after `marker`: the reason jsonargparse gives there."""
    rest = text[text.find(marker) + len(marker):] if marker in text else text
    return _one_line(rest)


def _one_line(text: str) -> str:
    lines = [line.strip().lstrip("- ").strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else str(text)


def _init_parameters(class_path: str) -> list[str]:
    """The constructor parameters of `class_path`, following `**kwargs` to the base classes (as the parser does)."""
    try:
        cls = _import(class_path)
    except Exception:  # noqa: BLE001 - only for a suggestion
        return []
    found = []
    for klass in inspect.getmro(cls):
        if "__init__" not in vars(klass):
            continue
        try:
            parameters = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            break
        found += [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return found


def _import(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)
