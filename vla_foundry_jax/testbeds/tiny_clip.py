"""Stable diffusion's tiny text encoder: ``tiny_data/tiny_clip`` (written by ``python -m launch.make_tiny_datasets``).

:func:`build_tiny_clip` saves a Hugging Face ``CLIPModel`` checkpoint (random init, text tower 2 layers x 64 wide,
16 positions) with a CLIP-style word-level tokenizer (:func:`build_clip_tokenizer`: ``<|startoftext|> ...
<|endoftext|>``, ``[PAD]`` padding) over the words of :data:`~vla_foundry_jax.testbeds.tiny_datasets.VOCAB_WORDS`:
the stable-diffusion quickstart's text encoder and tokenizer.
"""

from __future__ import annotations

from vla_foundry_jax.testbeds.tiny_datasets import word_level_core

CLIP_SPECIALS = ("[PAD]", "[UNK]", "<|startoftext|>", "<|endoftext|>")


def build_clip_tokenizer(out_dir: str | None = None):  # -> transformers.PreTrainedTokenizerFast
    """The tiny word-level vocabulary with CLIP's conventions: every text becomes ``<|startoftext|> ... <|endoftext|>``
    (``[PAD]`` = 0, ``[UNK]`` = 1, bos = 2, eos = 3; eos is not 2, which HF CLIP reads as a legacy config)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    pad, unk, bos, eos = CLIP_SPECIALS
    core, vocab = word_level_core(CLIP_SPECIALS, unk)
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos, model_max_length=16
    )
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def build_tiny_clip(out_dir: str, *, text_hidden: int = 64, max_positions: int = 16, seed: int = 0) -> str:
    """Save a tiny Hugging Face ``CLIPModel`` (random init, float32 safetensors) + :func:`build_clip_tokenizer`
    under ``out_dir``: the text encoder of the stable-diffusion quickstart (2 layers, ``text_hidden`` wide,
    ``max_positions`` positions); its vision tower is minimal (unused by stable diffusion). Needs torch (it is
    built with ``transformers.CLIPModel``); the bundled copy in tiny_data/ makes this a one-off."""
    try:
        import torch
        from transformers import CLIPConfig, CLIPModel
    except ImportError as e:  # pragma: no cover
        raise ImportError("building tiny_data/tiny_clip needs torch (pip install torch); it is bundled.") from e
    tok = build_clip_tokenizer(out_dir)
    text = dict(
        vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4)  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
