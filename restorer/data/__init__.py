"""Training and validation data: WebDataset shards -> JPEG-degraded uint8 batches.

Modules, in the order data flows through them: shards (listing and tar reading), plan (batches
per epoch, shards per slot), position (patch addresses, the data position a checkpoint stores,
the plan of a resumed epoch), reading (one slot's share of an epoch), shuffle (the per-epoch
buffer), stages (one worker's webdataset pipeline), augment (crop-first patches), degrade (JPEG),
batch (collation and the device copy), loader (the training loader), val (the validation loader);
config holds StreamConfig, skips the counters of what was skipped, quarantine the failed shards.

This file imports nothing: import from the module that defines a name
(``from restorer.data.loader import make_train_loader``), so that a program that needs one module
(``restorer restore`` needs ``degrade``) does not load the training loader and its dependencies.
"""
