"""shard_tools: pack image datasets into WebDataset shards."""

__version__ = "0.1.0"
