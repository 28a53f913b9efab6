"""Pre-training of a from-scratch teacher: BART/PEGASUS noising (`noising`) and its DataModule (`datamodule`)."""
