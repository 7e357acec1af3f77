"""Tiny generated datasets for the quickstart and the tests (written by ``python -m launch.make_tiny_datasets``).

Everything is built offline and deterministically from a seed:
* ``tokenizer/``: a word-level tokenizer (``tokenizers`` WordLevel, whitespace/punctuation split, lower-case)
  wrapped in ``transformers.PreTrainedTokenizerFast``; specials ``[PAD]`` = 0, ``[UNK]`` = 1,
  ``<|endoftext|>`` = 2 (eos). Loads with ``AutoTokenizer.from_pretrained("tiny_data/tokenizer")``.
* ``text_untokenized/``: documents of simple English from a small grammar (fox-and-dog sentences, counting,
  alphabet / weekday / month runs, colour copying, ...) as ``<key>.json`` raw text; lengths vary around
  seq_len so some are padded and some truncated.
* ``text/``: the same sentences, tokenized, each followed by eos, concatenated and cut into ``<key>.json.gz``
  lists of ``seq_len + 1`` ids.
A tiny LM's loss falls well below ln(vocab) within a few hundred steps on this corpus.

VLM data (``make_tiny_vlm_datasets``):
* ``shapes/train`` and ``shapes/val`` (image_caption): 48x48 PNGs of ONE filled shape (ball = circle,
  box = square, kite = diamond, hat = triangle) in one of six colours (red, green, blue, yellow, black, orange)
  on a plain light background, position, size and exact tints varying; caption ``"a <colour> <shape> ."`` (only
  words of the tiny tokenizer). Train and val are independent draws (different seeds).
* ``vlm_processor/``: a Hugging Face processor directory: ``SiglipImageProcessor`` config (32x32, bilinear,
  mean = std = 0.5) + the tiny tokenizer with ``"<image>"`` added as a special token (id 142, 143 tokens).
  Use it as ``image_caption.processor = 'tiny_data/vlm_processor'``.

Stable diffusion's tiny CLIP text encoder is :mod:`vla_foundry_jax.testbeds.tiny_clip`; the reach robotics task
:mod:`vla_foundry_jax.testbeds.tiny_robotics`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random

from vla_foundry_jax.data.shards import write_shards

SPECIALS = ("[PAD]", "[UNK]", "<|endoftext|>")
PAD, UNK, EOS = SPECIALS

NUMBERS = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = "january february march april may june july august september october november december".split()
COLORS = "red blue green yellow black white brown orange".split()
ADJS = "quick lazy big small happy sleepy old young".split()
ANIMALS = "fox dog cat bird horse cow duck mouse frog bear".split()
VERBS = "jumps runs walks hops flies looks".split()
NAMES = "anna ben carl dora emma finn gina hugo".split()
PLACES = "park garden house forest river city".split()
FRUITS = "apples pears plums grapes lemons cherries".split()
THINGS = "ball hat car box cup kite".split()
FUNCTION = "the over and has likes to play in i see is it then after comes . ,".split()

VOCAB_WORDS = sorted(
    set(NUMBERS + LETTERS + DAYS + MONTHS + COLORS + ADJS + ANIMALS + VERBS + NAMES + PLACES + FRUITS + THINGS)
    | set(FUNCTION)
)


def _run(rng: random.Random, seq: list[str], lo: int, hi: int) -> list[str]:
    n = rng.randint(lo, hi)
    start = rng.randint(0, len(seq) - n)
    return seq[start : start + n]


def sentence(rng: random.Random) -> str:
    """One sentence from the grammar (space-separated words, ending with ' .')."""
    kind = rng.randrange(7)
    if kind == 0:
        w = [
            "the", rng.choice(ADJS), rng.choice(ANIMALS), rng.choice(VERBS),
            "over", "the", rng.choice(ADJS), rng.choice(ANIMALS),
        ]  # fmt: skip
    elif kind == 1:
        w = _run(rng, NUMBERS, 4, 9)
    elif kind == 2:
        w = _run(rng, LETTERS, 4, 9)
    elif kind == 3:
        w = _run(rng, DAYS, 3, 7) if rng.random() < 0.5 else _run(rng, MONTHS, 3, 7)
    elif kind == 4:
        c, t = rng.choice(COLORS), rng.choice(THINGS)
        w = ["i", "see", "a", c, t, ".", "the", t, "is", c]
    elif kind == 5:
        w = [rng.choice(NAMES), "has", rng.choice(NUMBERS[:10]), rng.choice(FRUITS), "and"]
        w += [rng.choice(NUMBERS[:10]), rng.choice(FRUITS)]
    else:
        i = rng.randrange(len(NUMBERS) - 1)
        w = ["after", NUMBERS[i], "comes", NUMBERS[i + 1], ",", "then", NUMBERS[min(i + 2, len(NUMBERS) - 1)]]
        if rng.random() < 0.5:
            w = [rng.choice(NAMES), "likes", "to", "play", "in", "the", rng.choice(PLACES)]
    return " ".join([*w, "."])


def documents(num_docs: int, seed: int = 0) -> list[list[str]]:
    """``num_docs`` documents, each a list of 6..18 sentences."""
    rng = random.Random(seed)
    return [[sentence(rng) for _ in range(rng.randint(6, 18))] for _ in range(num_docs)]


def word_level_core(specials: tuple[str, ...], unk: str):  # -> (tokenizers.Tokenizer, vocab dict)
    """A lower-casing, whitespace-split word-level ``tokenizers.Tokenizer`` over ``specials`` then
    ``VOCAB_WORDS`` (ids in that order), and its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate([*specials, *VOCAB_WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    core.add_special_tokens(list(specials))
    return core, vocab


def build_tokenizer(out_dir: str | None = None):  # -> transformers.PreTrainedTokenizerFast
    """The word-level tokenizer over ``VOCAB_WORDS``; saved with ``save_pretrained`` when ``out_dir`` is given."""
    from transformers import PreTrainedTokenizerFast

    core, _ = word_level_core(SPECIALS, UNK)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, eos_token=EOS)
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def make_tiny_datasets(
    out_dir: str,
    *,
    seq_len: int = 128,
    num_docs: int = 512,
    num_shards: int = 4,
    seed: int = 0,
) -> dict[str, str]:
    """Write tokenizer/, text_untokenized/ and text/ under ``out_dir``; returns their paths (manifests)."""
    tok = build_tokenizer(os.path.join(out_dir, "tokenizer"))
    docs = documents(num_docs, seed)

    per_shard = -(-num_docs // num_shards)
    raw = [{"__key__": f"{i:06d}", "json": " ".join(d).encode("utf-8")} for i, d in enumerate(docs)]
    untok = write_shards(os.path.join(out_dir, "text_untokenized"), raw, samples_per_shard=per_shard)

    eos = tok.convert_tokens_to_ids(EOS)
    stream: list[int] = []
    for d in docs:
        for s in d:
            stream += tok(s, add_special_tokens=False)["input_ids"] + [eos]
    width = seq_len + 1
    chunks = [stream[i : i + width] for i in range(0, len(stream) - width + 1, width)]
    packed = [
        {"__key__": f"{i:06d}", "json.gz": gzip.compress(json.dumps(c).encode("utf-8"), mtime=0)}
        for i, c in enumerate(chunks)
    ]
    text = write_shards(os.path.join(out_dir, "text"), packed, samples_per_shard=-(-len(packed) // num_shards))
    return {"tokenizer": os.path.join(out_dir, "tokenizer"), "text_untokenized": untok, "text": text}


# ---------------------------------------------------------------- VLM: coloured shapes + processor

SHAPE_COLORS = {
    "red": (215, 35, 35),
    "green": (40, 160, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 205, 20),
    "black": (25, 25, 25),
    "orange": (245, 135, 20),
}
SHAPE_NAMES = ("ball", "box", "kite", "hat")
IMAGE_TOKEN = "<image>"


def _shape_polygon(shape: str, cx: int, cy: int, r: int) -> list[tuple[int, int]] | None:
    if shape == "kite":  # diamond
        k = round(0.7 * r)
        return [(cx, cy - r), (cx + k, cy), (cx, cy + r), (cx - k, cy)]
    if shape == "hat":  # triangle
        d = round(0.8 * r)
        return [(cx, cy - r), (cx + r, cy + d), (cx - r, cy + d)]
    return None


def shape_image(rng: random.Random, colour: str, shape: str, size: int = 48):  # -> PIL.Image.Image
    """One ``size x size`` RGB image: a ``colour`` ``shape`` on a light background (random tints and placement)."""
    from PIL import Image, ImageDraw

    base = rng.randint(215, 245)
    background = tuple(min(255, base + rng.randint(-8, 8)) for _ in range(3))
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in SHAPE_COLORS[colour])
    r = rng.randint(size * 12 // 48, size * 17 // 48)
    cx = rng.randint(r + 2, size - r - 3)
    cy = rng.randint(r + 2, size - r - 3)
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    if shape == "ball":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "box":
        h = round(0.85 * r)
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=fill)
    return img


def shape_samples(num: int, seed: int, size: int = 48) -> list[dict[str, bytes]]:
    """``num`` image_caption samples ``{"__key__", "txt": caption, "png": image}``; caption ``a <colour> <shape> .``"""
    rng = random.Random(seed)
    colours = list(SHAPE_COLORS)
    out = []
    for i in range(num):
        colour, shape = rng.choice(colours), rng.choice(SHAPE_NAMES)
        buf = io.BytesIO()
        shape_image(rng, colour, shape, size).save(buf, format="PNG")
        out.append({"__key__": f"{i:06d}", "txt": f"a {colour} {shape} .".encode(), "png": buf.getvalue()})
    return out


def build_vlm_processor(out_dir: str, *, image_size: int = 32) -> str:
    """Save a Hugging Face processor directory: SigLIP-style image processor (``image_size``, bilinear,
    mean = std = 0.5) + the tiny tokenizer with ``"<image>"`` added as a special token."""
    from transformers.utils import logging as hf_logging

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "requires torchvision, falling back to the PIL backend" is expected
    try:
        from transformers import SiglipImageProcessor

        image = SiglipImageProcessor(
            size={"height": image_size, "width": image_size},
            resample=2,  # PIL bilinear
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    image.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def make_tiny_vlm_datasets(
    out_dir: str,
    *,
    num_train: int = 1024,
    num_val: int = 192,
    image_size: int = 48,
    processor_image_size: int = 32,
    samples_per_shard: int = 128,
    seed: int = 0,
) -> dict[str, str]:
    """Write ``shapes/train``, ``shapes/val`` (manifest.jsonl + shards) and ``vlm_processor/`` under ``out_dir``."""
    shapes = os.path.join(out_dir, "shapes")
    train = write_shards(
        os.path.join(shapes, "train"),
        shape_samples(num_train, seed * 1000 + 1, image_size),
        samples_per_shard=samples_per_shard,
    )
    val = write_shards(
        os.path.join(shapes, "val"),
        shape_samples(num_val, seed * 1000 + 2, image_size),
        samples_per_shard=samples_per_shard,
    )
    processor = build_vlm_processor(os.path.join(out_dir, "vlm_processor"), image_size=processor_image_size)
    return {"shapes_train": train, "shapes_val": val, "vlm_processor": processor}
