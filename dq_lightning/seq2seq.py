"""Old import path of `dq_lightning.modules.seq2seq.Seq2SeqModule`, kept so that configs, run folders and checkpoints
written before the LightningModules and DataModules moved still load. New code imports the new path."""

from dq_lightning.modules.seq2seq import *  # noqa: F401,F403
from dq_lightning.modules.seq2seq import Seq2SeqModule  # noqa: F401
