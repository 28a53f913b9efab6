"""Loaded into DDP test runs with --trainer.callbacks+=tests.ddp_probe.WeightsDigest."""

import hashlib
import os

import lightning.pytorch as pl


class WeightsDigest(pl.Callback):
    """Each rank writes a digest of its final weights, to check that DDP kept the ranks identical."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.sha256"), "w") as out:
            out.write(digest.hexdigest())
