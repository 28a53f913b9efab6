"""The offline `demo` task: summarize a Python docstring into its first sentence.

The text is real prose that no one on this project wrote: the docstrings of the Python standard library
installed with the interpreter, so the corpus exists on every machine with nothing downloaded. Each example
is one documented function, class or method:

- source: its qualified name, then the docstring without its first sentence;
- target: the first sentence of the docstring (its one-line summary).

The name is kept in the source because the body alone often does not determine the summary ("Return the
number of ..."), while name plus body does. Splits are assigned by a hash of the qualified name, so they do
not move when the corpus grows or shrinks by a few entries across Python versions.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import pkgutil
import re
import sys
import warnings
from pathlib import Path

# Whole standard library, minus modules that are slow, noisy, platform-specific or start things on import.
SKIP_MODULE_PREFIXES = (
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
    "venv", "pydoc_data", "distutils", "msilib", "winreg", "winsound", "_", "encodings", "ctypes.test",
    "sqlite3.test", "unittest.test", "multiprocessing.popen", "asyncio.windows", "xxsubtype", "crypt",
    "nis", "spwd", "ossaudiodev", "lib2to3", "curses", "dbm.gnu", "dbm.ndbm", "readline",
)
SPLIT_SHARES = (("train", 0.8), ("validation", 0.1), ("test", 0.1))
MIN_SOURCE_WORDS = 12
MIN_TARGET_WORDS = 4
_FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(\s+|$)", re.S)


def _stdlib_module_names() -> list[str]:
    names = set(sys.stdlib_module_names)
    stdlib_dir = Path(inspect.getfile(json)).parent.parent
    found = []
    for name in sorted(names):
        if name.startswith(SKIP_MODULE_PREFIXES):
            continue
        found.append(name)
        path = stdlib_dir / name
        if (path / "__init__.py").exists():
            # iter_modules, not walk_packages: walking imports every package, and some raise on import.
            for sub in pkgutil.iter_modules([str(path)], prefix=f"{name}."):
                if not any(part.startswith(SKIP_MODULE_PREFIXES) for part in sub.name.split(".")):
                    found.append(sub.name)
    return found


def _split_docstring(doc: str) -> tuple[str, str] | None:
    text = " ".join(inspect.cleandoc(doc).split())
    match = _FIRST_SENTENCE.match(text)
    if not match:
        return None
    summary, body = match.group(1).strip(), text[match.end():].strip()
    if len(summary.split()) < MIN_TARGET_WORDS or len(body.split()) < MIN_SOURCE_WORDS:
        return None
    return summary, body


def _documented_objects(module):
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield f"{module.__name__}.{name}", obj
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and (inspect.isfunction(member) or inspect.ismethoddescriptor(member)):
                    yield f"{module.__name__}.{name}.{attr}", member
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield f"{module.__name__}.{name}", obj


def split_of(qualname: str) -> str:
    bucket = int(hashlib.sha256(qualname.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    cumulative = 0.0
    for split, share in SPLIT_SHARES:
        cumulative += share
        if bucket <= cumulative:
            return split
    return SPLIT_SHARES[-1][0]


def build_examples() -> list[dict]:
    """Every usable (name + body -> first sentence) example of the installed standard library."""
    examples, seen_docs = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in _stdlib_module_names():
            try:
                module = importlib.import_module(module_name)
            except BaseException:  # noqa: BLE001 - an unimportable stdlib module is simply not in the corpus
                continue
            for qualname, obj in _documented_objects(module):
                doc = inspect.getdoc(obj) if not inspect.isbuiltin(obj) else obj.__doc__
                if not doc or doc in seen_docs:
                    continue
                seen_docs.add(doc)
                parts = _split_docstring(doc)
                if parts:
                    summary, body = parts
                    examples.append({"id": qualname, "document": f"{qualname}. {body}", "summary": summary})
    return examples


def write_corpus(out_dir: Path) -> dict[str, int]:
    """Write {train,validation,test}.jsonl under `out_dir` (atomically) and return the row counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {split: [] for split, _ in SPLIT_SHARES}
    for example in build_examples():
        rows[split_of(example["id"])].append(example)
    for split, examples in rows.items():
        tmp = out_dir / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
        tmp.replace(out_dir / f"{split}.jsonl")
    return {split: len(examples) for split, examples in rows.items()}
