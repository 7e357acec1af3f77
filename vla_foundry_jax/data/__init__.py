"""Data layer: grain pipelines over VLA Foundry manifests + tar shards, and the tiny generated datasets."""

from vla_foundry_jax.data.pipeline import TrainIterator, build_train_iterator
from vla_foundry_jax.data.shards import DataError, ShardDataSource, read_manifest, write_shards
from vla_foundry_jax.data.text import TextTransform, TextUntokenizedTransform, load_tokenizer, tokenizer_info

__all__ = [
    "DataError",
    "ShardDataSource",
    "TextTransform",
    "TextUntokenizedTransform",
    "TrainIterator",
    "build_train_iterator",
    "load_tokenizer",
    "read_manifest",
    "tokenizer_info",
    "write_shards",
]
