"""Old import path of `dq_lightning.modules.student.DQStudentModule`, kept so that configs, run folders and checkpoints
written before the LightningModules and DataModules moved still load. New code imports the new path."""

from dq_lightning.modules.student import *  # noqa: F401,F403
from dq_lightning.modules.student import DQStudentModule  # noqa: F401
