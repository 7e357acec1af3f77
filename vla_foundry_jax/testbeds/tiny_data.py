"""Every bundled tiny dataset in one call: what ``python -m launch.make_tiny_datasets`` writes to ``tiny_data/``.

* ``tokenizer``, ``text_untokenized``, ``text``: :func:`~vla_foundry_jax.testbeds.tiny_datasets.make_tiny_datasets`;
* ``reach/{train,val}``: :func:`~vla_foundry_jax.testbeds.tiny_robotics.make_tiny_robotics_datasets`;
* ``shapes/{train,val}``, ``vlm_processor``: :func:`~vla_foundry_jax.testbeds.tiny_datasets.make_tiny_vlm_datasets`;
* ``tiny_clip``: :func:`~vla_foundry_jax.testbeds.tiny_clip.build_tiny_clip` (needs torch).

Deterministic: rerunning gives identical bytes.
"""

from __future__ import annotations

import os

from vla_foundry_jax.testbeds.tiny_clip import build_tiny_clip
from vla_foundry_jax.testbeds.tiny_datasets import make_tiny_datasets, make_tiny_vlm_datasets
from vla_foundry_jax.testbeds.tiny_robotics import make_tiny_robotics_datasets


def make_tiny_data(
    out_dir: str,
    *,
    seq_len: int = 128,
    num_docs: int = 512,
    num_shards: int = 4,
    seed: int = 0,
    num_train_images: int = 1024,
    num_val_images: int = 192,
    skip_vlm: bool = False,
    skip_robotics: bool = False,
    only_robotics: bool = False,
    reach_train_samples: int = 544,
    reach_val_samples: int = 64,
    reach_samples_per_episode: int = 1,
    reach_distractors: int = 0,
) -> dict[str, str]:
    """Write the tiny datasets under ``out_dir``; returns ``{name: path}`` of what was written.

    ``skip_vlm``: only text (+ robotics); ``skip_robotics``: no ``reach/``; ``only_robotics``: ``reach/`` only.
    The defaults reproduce the bundled ``tiny_data/`` byte for byte.
    """
    paths: dict[str, str] = {}
    if not only_robotics:
        paths |= make_tiny_datasets(out_dir, seq_len=seq_len, num_docs=num_docs, num_shards=num_shards, seed=seed)
    if not skip_robotics:
        paths |= make_tiny_robotics_datasets(
            out_dir,
            num_train=reach_train_samples,
            num_val=reach_val_samples,
            samples_per_episode=reach_samples_per_episode,
            num_distractors=reach_distractors,
            seed=seed,
        )
    if not skip_vlm and not only_robotics:
        paths |= make_tiny_vlm_datasets(out_dir, num_train=num_train_images, num_val=num_val_images, seed=seed)
        paths["tiny_clip"] = build_tiny_clip(os.path.join(out_dir, "tiny_clip"), seed=seed)
    return paths


def tree_size(path: str) -> int:
    """Bytes of every file under ``path``."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
