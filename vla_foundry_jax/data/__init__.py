"""Data layer: grain pipelines over VLA Foundry manifests + tar shards (the tiny generated datasets: ``testbeds``)."""

from vla_foundry_jax.data.image_caption import ImageCaptionSource, ImageCaptionTransform
from vla_foundry_jax.data.pipeline import EvalIterator, TrainIterator, build_eval_iterator, build_train_iterator
from vla_foundry_jax.data.processor import VLMProcessor, load_processor, processor_for_data, processor_info
from vla_foundry_jax.data.shards import DataError, ShardDataSource, read_manifest, write_shards
from vla_foundry_jax.data.text import TextTransform, TextUntokenizedTransform, load_tokenizer, tokenizer_info

__all__ = [
    "DataError",
    "EvalIterator",
    "ImageCaptionSource",
    "ImageCaptionTransform",
    "ShardDataSource",
    "TextTransform",
    "TextUntokenizedTransform",
    "TrainIterator",
    "VLMProcessor",
    "build_eval_iterator",
    "build_train_iterator",
    "load_processor",
    "load_tokenizer",
    "processor_for_data",
    "processor_info",
    "read_manifest",
    "tokenizer_info",
    "write_shards",
]
