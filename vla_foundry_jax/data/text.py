"""Per-sample transforms for the ``text`` and ``text_untokenized`` modalities, and tokenizer loading.

Both produce ``{"input_ids": int32 [seq_len + 1], "loss_mask": bool [seq_len + 1]}``; ``loss_mask`` is True
on real tokens, so the loss masks its targets with ``loss_mask[:, 1:]`` (the original masks targets equal to
the pad id, which is the same thing unless raw text contains the pad token itself).

Differences from the original, all forced or made harmless by random access:
* ``text``: the original drops samples with <= seq_len tokens; a random-access source cannot drop without
  changing its length, so short samples are right-padded with id 0 and masked out of the loss instead.
  Samples longer than seq_len + 1 get a window of seq_len + 1 tokens at a random start in
  ``[0, len - seq_len)`` (the range of the original's ``sample_chunk``), drawn per sample from grain's
  (seed, index) RNG instead of once per batch from the global torch RNG.
* ``text_untokenized``: tokenized per sample (in grain's reader threads) instead of per batch; the result is
  the same ``padding="max_length", truncation`` output.

Bad samples (``BadSampleError``, skipped and counted by the pipeline, see ``data.bad_samples``): a missing
member, a ``json.gz`` that is not a gzip JSON list of ids (truncated, corrupt), text that is not UTF-8, and a
``json`` member that starts like a JSON object but does not parse or has no string ``text`` field (it is never
trained on as literal text).
"""

from __future__ import annotations

import functools
import gzip
import json
import threading
import zlib
from typing import Any

import numpy as np

from vla_foundry_jax import paths
from vla_foundry_jax.data.shards import BadSampleError, DataError

TEXT_PAD_ID = 0  # fills (masked) positions of pre-tokenized samples shorter than seq_len + 1
_TOKENIZER_LOCK = threading.Lock()


def sample_where(sample: dict[str, Any]) -> str:
    """``sample <key> of shard <shard>`` for error messages."""
    return f"sample {sample.get('__key__')!r} of shard {sample.get('__shard__')!r}"


class TextTransform:
    """``text`` modality: ``<key>.json.gz`` (gzip JSON list of token ids) -> fixed-length ids + mask.

    Used with ``MapDataset.random_map``: ``rng`` is grain's per-(seed, index) generator.
    """

    def __init__(self, seq_len: int, field: str = "json.gz") -> None:
        self.seq_len = seq_len
        self.field = field

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.field not in sample:
            raise BadSampleError.of(
                sample, f"text data: {sample_where(sample)} has no {self.field!r} member (fields: {sorted(sample)})."
            )
        try:
            ids = np.asarray(json.loads(gzip.decompress(sample[self.field])), dtype=np.int64)
        except (OSError, EOFError, zlib.error, ValueError, TypeError, OverflowError) as e:
            raise BadSampleError.of(
                sample,
                f"text data: cannot decode {sample_where(sample)} as a gzip JSON list of ids "
                f"({type(e).__name__}: {e}).",
            ) from e
        if ids.ndim != 1:
            raise BadSampleError.of(
                sample, f"text data: {sample_where(sample)} is not a flat list of token ids (shape {ids.shape})."
            )
        width = self.seq_len + 1
        if len(ids) > width:
            start = int(rng.integers(0, len(ids) - self.seq_len))
            ids = ids[start : start + width]
        return pad_or_truncate(ids, width, TEXT_PAD_ID)


class TextUntokenizedTransform:
    """``text_untokenized`` modality: ``<key>.json`` raw UTF-8 text (or a JSON object with a "text" field),
    tokenized with a Hugging Face tokenizer and right-padded / truncated to seq_len + 1."""

    def __init__(self, seq_len: int, tokenizer: str, field: str = "json") -> None:
        self.seq_len = seq_len
        self.tokenizer_name = tokenizer
        self.field = field

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        del rng
        text = untokenized_text(sample, self.field)
        tok = load_tokenizer(self.tokenizer_name)
        # No truncation/padding arguments: those mutate the shared Rust tokenizer, which is not safe from
        # several reader threads at once; we cut and pad in numpy instead.
        ids = np.asarray(tok(text)["input_ids"], dtype=np.int64)
        return pad_or_truncate(ids, self.seq_len + 1, tok.pad_token_id)


def untokenized_text(sample: dict[str, Any], field: str) -> str:
    """The text of a ``text_untokenized`` sample's ``field`` member (:func:`sample_text`); ``BadSampleError`` when
    the sample has no such member."""
    if field not in sample:
        raise BadSampleError.of(
            sample,
            f"text_untokenized data: {sample_where(sample)} has no {field!r} member (fields: {sorted(sample)}).",
        )
    return sample_text(sample[field], where=sample_where(sample), sample=sample)


def sample_text(raw: bytes, *, where: str = "sample", sample: dict[str, Any] | None = None) -> str:
    """Raw member bytes -> text; a payload starting with ``{`` is a JSON object and its "text" field is used.

    Raises ``BadSampleError`` (for ``sample``, the raw sample, when given) for bytes that are not UTF-8 and for
    a JSON object that does not parse or has no string "text" field.
    """
    sample = sample or {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSampleError.of(sample, f"text_untokenized data: {where} is not UTF-8 text: {e}") from e
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadSampleError.of(
                sample, f"text_untokenized data: {where} starts like a JSON object but is not valid JSON: {e}"
            ) from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise BadSampleError.of(
                sample, f"text_untokenized data: {where} is a JSON object without a string 'text' field ({keys})."
            )
        return obj["text"]
    return text


def pad_or_truncate(ids: np.ndarray, width: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad with ``pad_id`` / truncate to ``width``; mask is True on the real tokens."""
    n = min(len(ids), width)
    out = np.full((width,), pad_id, dtype=np.int32)
    out[:n] = ids[:n]
    mask = np.zeros((width,), dtype=bool)
    mask[:n] = True
    return {"input_ids": out, "loss_mask": mask}


@functools.cache
def load_tokenizer(name: str) -> Any:
    """``AutoTokenizer.from_pretrained(name)`` (hub id or local dir), with ``[PAD]`` added if it has no pad
    token (as the original: GPT-NeoX gets id 50277). Cached per name and shared by all threads."""
    with _TOKENIZER_LOCK:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover
            raise ImportError("text_untokenized data needs `transformers` (pip install transformers).") from e
        try:
            tok = AutoTokenizer.from_pretrained(paths.local_dir(name) if paths.is_remote(name) else name)
        except OSError as e:
            raise DataError(
                f"Cannot load tokenizer {name!r} (data.tokenizer): {e}. Give a local tokenizer directory "
                "(e.g. tiny_data/tokenizer) or a Hugging Face hub id reachable from this machine."
            ) from e
        if tok.pad_token is None:
            tok.add_special_tokens({"pad_token": "[PAD]"})
        return tok


def tokenizer_name(data: Any) -> str | None:
    """The tokenizer a data params object names, or None (pre-tokenized ``text`` data names none)."""
    return getattr(data, "tokenizer", None)


def tokenizer_info(data: Any) -> tuple[int | None, int | None]:
    """``(vocab_len, pad_token_id)`` of ``data.tokenizer`` after adding ``[PAD]`` where missing.

    ``vocab_len`` is ``len(tokenizer)`` (counts added tokens) and falls back to ``vocab_size``; the trainer
    checks that the model's vocab_size covers it. ``(None, None)`` when the data names no tokenizer.
    """
    name = tokenizer_name(data)
    if name is None:
        return None, None
    tok = load_tokenizer(name)
    try:
        vocab_len = len(tok)
    except TypeError:
        vocab_len = tok.vocab_size
    return int(vocab_len or tok.vocab_size), int(tok.pad_token_id)
