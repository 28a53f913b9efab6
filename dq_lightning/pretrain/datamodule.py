"""Old import path of `dq_lightning.data.pretrain.DenoisingDataModule`, kept so that configs, run folders and checkpoints
written before the LightningModules and DataModules moved still load. New code imports the new path."""

from dq_lightning.data.pretrain import *  # noqa: F401,F403
from dq_lightning.data.pretrain import DenoisingDataModule  # noqa: F401
