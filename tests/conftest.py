"""Pytest fixtures shared by several test modules; the builders behind them live in ``tests/fixtures/``.

Tests run on the host CPU; multi-device tests start subprocesses with their own XLA_FLAGS
(``tests/fixtures/multidevice.py``).
"""

from __future__ import annotations

import os
import sys

import gin
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests.fixtures` importable

from tests.fixtures.object_store import gcs, gcs_server, s3, s3_server  # noqa: F401  (fixtures)


def _cleared_gin_config():
    gin.clear_config()
    yield
    gin.clear_config()


# No gin binding parsed by one test module reaches the params another module builds.
_fresh_gin_config = pytest.fixture(autouse=True, scope="module", name="_fresh_gin_config")(_cleared_gin_config)
# Per test, for modules whose params must see class defaults: ``pytestmark = pytest.mark.usefixtures("fresh_gin")``.
fresh_gin = pytest.fixture(name="fresh_gin")(_cleared_gin_config)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A tiny CLIP config directory (text width 16; no weights, so models are built from it with
    ``load_weights=False``; no tokenizer: the empty prompt falls back to the config's ids)."""
    from tests.fixtures.hf_checkpoints import tiny_clip_config

    path = tmp_path_factory.mktemp("clip")
    tiny_clip_config().save_pretrained(str(path))
    return str(path)
