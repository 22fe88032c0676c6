"""Token data: pretokenized shards on disk, mixture sampling and sequence packing for the trainer."""

from omnitok.data.packing import Batch, MixtureSampler, pack_rows
from omnitok.data.shards import ShardWriter, TokenDataset, load_manifest, read_vocab_size, write_manifest

__all__ = [
    "Batch",
    "MixtureSampler",
    "ShardWriter",
    "TokenDataset",
    "load_manifest",
    "pack_rows",
    "read_vocab_size",
    "write_manifest",
]
