"""Real compression: a DQ student written as packed low-bit codes (`export_student`), loaded back as a standard
transformers model (`load_packed`, optionally on the int8 path) and used from the command line
(`python -m dq_lightning export`, `python -m dq_lightning predict --model DIR`)."""

from dq_lightning.export.export import export_student
from dq_lightning.export.loading import load_packed
from dq_lightning.export.packing import pack, unpack

__all__ = ["export_student", "load_packed", "pack", "unpack"]
