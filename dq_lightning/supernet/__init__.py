"""The elastic DQ supernet: one training for the whole trade-off curve.

`grid` (the points: bits, depth, width), `subnetwork` (a point's student run on the supernet's tensors),
`sampling` (which points a step trains) and `extract` (a point as an ordinary DQ student checkpoint); the
LightningModule that trains them is `dq_lightning.modules.supernet.DQSupernetModule`.
"""
