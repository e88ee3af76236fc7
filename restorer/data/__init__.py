"""Training and validation data: WebDataset shards -> JPEG-degraded uint8 batches.

Modules, in the order data flows through them: shards (listing and tar reading), plan (batches
per epoch, shards per slot), position (patch addresses, the data position a checkpoint stores,
the plan of a resumed epoch), reading (one slot's share of an epoch), shuffle (the per-epoch
buffer), stages (one worker's webdataset pipeline), augment (crop-first patches), degrade (JPEG),
batch (collation and the device copy), loader (the training loader), val (the validation loader);
config holds StreamConfig, skips the counters of what was skipped, quarantine the failed shards.
"""

from restorer.data.batch import to_device_float
from restorer.data.config import StreamConfig
from restorer.data.loader import SharedEpoch, make_train_loader
from restorer.data.shards import resolve_shards
from restorer.data.val import make_val_loader

__all__ = ["StreamConfig", "SharedEpoch", "make_train_loader", "make_val_loader", "to_device_float", "resolve_shards"]
