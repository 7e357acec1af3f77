"""Data layer: shard reading, text transforms, tokenizer info, mixing, host sharding, determinism, resume."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.fixtures.paths import TINY
from vla_foundry_jax.data import (
    DataError,
    ShardDataSource,
    TextTransform,
    TextUntokenizedTransform,
    build_train_iterator,
    tokenizer_info,
    write_shards,
)
from vla_foundry_jax.params import TextDataParams, TextUntokenizedDataParams
from vla_foundry_jax.testbeds.tiny_datasets import build_tokenizer, make_tiny_datasets

SEQ = 8


def _gz(ids: list[int]) -> bytes:
    return gzip.compress(json.dumps(ids).encode(), mtime=0)


def make_text(root, name: str, n: int, *, base: int = 0, per_shard: int = 7) -> str:
    """n pre-tokenized samples; sample i is ``[base + i] * (SEQ + 1)`` so a row names its sample."""
    samples = [{"__key__": f"{i:06d}", "json.gz": _gz([base + i] * (SEQ + 1))} for i in range(n)]
    return write_shards(str(root / name), samples, samples_per_shard=per_shard)


def first_ids(batches) -> np.ndarray:
    return np.concatenate([b["input_ids"][:, 0] for b in batches])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tok"))
    build_tokenizer(path)
    return path


# ---------------------------------------------------------------- shards


def test_shard_source_groups_members_and_counts_real_samples(tmp_path):
    members = [
        ("a/000001.json.gz", b"gz1"),
        ("a/000001.meta.json", b"{}"),
        ("noextension", b"skipped"),
        ("000002.json", b"hello"),
        ("000003.scene_right_0_t-1.jpg", b"jpg"),
        ("000003.lowdim.npz", b"npz"),
    ]
    with tarfile.open(tmp_path / "s0.tar", "w") as tar:
        tar.addfile(tarfile.TarInfo("a"), None)  # a directory-like member without data
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"shard": "s0", "num_sequences": 512}) + "\n")
    src = ShardDataSource(str(tmp_path / "manifest.jsonl"))
    assert len(src) == 3  # what is in the tar, not the manifest's 512
    assert src[0] == {"__key__": "a/000001", "__shard__": "s0", "json.gz": b"gz1", "meta.json": b"{}"}
    assert src[1] == {"__key__": "000002", "__shard__": "s0", "json": b"hello"}
    assert src[2]["scene_right_0_t-1.jpg"] == b"jpg" and src[2]["lowdim.npz"] == b"npz"
    clone = pickle.loads(pickle.dumps(src))
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda i: clone[i % 3]["__key__"], range(30))) == [
            src[i % 3]["__key__"] for i in range(30)
        ]


def test_multi_shard_order(tmp_path):
    manifest = make_text(tmp_path, "d", 17, per_shard=5)
    src = ShardDataSource(manifest)
    assert len(src) == 17 and src.samples_per_shard == [5, 5, 5, 2]
    assert [json.loads(gzip.decompress(src[i]["json.gz"]))[0] for i in range(17)] == list(range(17))


def test_manifest_errors(tmp_path):
    missing = str(tmp_path / "nope" / "manifest.jsonl")
    with pytest.raises(DataError, match=r"(?s)nope/manifest\.jsonl.*data\.dataset_manifest"):
        ShardDataSource(missing)
    manifest = make_text(tmp_path, "d", 10, per_shard=5)
    os.remove(tmp_path / "d" / "shard-0001.tar")
    with pytest.raises(DataError, match=r"shard-0001.*manifest\.jsonl"):
        ShardDataSource(manifest)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no shards"):
        ShardDataSource(str(tmp_path / "empty.jsonl"))
    data = TextDataParams(dataset_manifest=[missing], seq_len=SEQ)
    with pytest.raises(DataError, match=r"data\.dataset_manifest"):
        build_train_iterator(data, global_batch_size=2, num_batches=1)


# ---------------------------------------------------------------- transforms


def test_text_transform_window_and_padding():
    t = TextTransform(SEQ)
    long = {"__key__": "k", "json.gz": _gz(list(range(50)))}
    outs = [t(long, np.random.default_rng(s)) for s in range(20)]
    starts = set()
    for o in outs:
        ids = o["input_ids"]
        assert ids.dtype == np.int32 and ids.shape == (SEQ + 1,) and o["loss_mask"].all()
        assert np.array_equal(np.diff(ids), np.ones(SEQ)) and 0 <= ids[0] <= 50 - SEQ - 1
        starts.add(int(ids[0]))
    assert len(starts) > 5  # random window
    again = t(long, np.random.default_rng(3))["input_ids"]
    assert np.array_equal(again, outs[3]["input_ids"])  # deterministic given the rng
    short = t({"__key__": "k", "json.gz": _gz([5, 6, 7])}, np.random.default_rng(0))
    assert short["input_ids"].tolist() == [5, 6, 7] + [0] * (SEQ - 2)
    assert short["loss_mask"].tolist() == [True] * 3 + [False] * (SEQ - 2)
    with pytest.raises(DataError, match=r"'kk'.*json\.gz"):
        t({"__key__": "kk", "json": b"x"}, np.random.default_rng(0))


def test_text_untokenized_transform(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    t = TextUntokenizedTransform(SEQ, tokenizer_dir)
    out = t({"__key__": "k", "json": b"the red fox jumps ."})
    expect = tok("the red fox jumps .")["input_ids"]
    assert len(expect) == 5
    assert out["input_ids"].tolist() == expect + [tok.pad_token_id] * (SEQ + 1 - 5)
    assert out["loss_mask"].tolist() == [True] * 5 + [False] * (SEQ + 1 - 5)
    assert tok.pad_token_id == 0
    as_json = t({"__key__": "k", "json": json.dumps({"text": "the red fox jumps .", "url": "x"}).encode()})
    assert np.array_equal(as_json["input_ids"], out["input_ids"])
    long = t({"__key__": "k", "json": b"one two three four five six seven eight nine ten eleven"})
    assert long["input_ids"].tolist() == tok("one two three four five six seven eight nine")["input_ids"]
    assert long["loss_mask"].all()


def test_tokenizer_info_and_missing_pad(tmp_path, tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    data = TextUntokenizedDataParams(dataset_manifest=["m"], tokenizer=tokenizer_dir, seq_len=SEQ)
    vocab_len, pad = tokenizer_info(data)
    assert pad == 0 and vocab_len == len(PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)) < 300
    assert tokenizer_info(TextDataParams(dataset_manifest=["m"], seq_len=SEQ)) == (None, None)
    # A tokenizer without a pad token gets "[PAD]" appended (the original's GPT-NeoX -> 50277 rule).
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    nopad = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    assert nopad.pad_token is None and len(nopad) == 3
    nopad.save_pretrained(str(tmp_path / "nopad"))
    info = tokenizer_info(TextUntokenizedDataParams(dataset_manifest=["m"], tokenizer=str(tmp_path / "nopad")))
    assert info == (4, 3)


# ---------------------------------------------------------------- pipeline


def _two_datasets(tmp_path, n1=200, n2=200):
    return make_text(tmp_path, "a", n1, base=1000), make_text(tmp_path, "b", n2, base=5000)


def test_batches_shapes_and_untokenized_pipeline(tmp_path, tokenizer_dir):
    raw = [{"__key__": f"{i:04d}", "json": ("one two three " * (i % 4)).encode()} for i in range(12)]
    manifest = write_shards(str(tmp_path / "u"), raw, samples_per_shard=5)
    data = TextUntokenizedDataParams(dataset_manifest=[manifest], tokenizer=tokenizer_dir, seq_len=SEQ, shuffle=False)
    batches = list(build_train_iterator(data, global_batch_size=4, num_batches=3))
    assert len(batches) == 3
    for b in batches:
        assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (4, SEQ + 1)
        assert b["loss_mask"].dtype == np.bool_ and b["loss_mask"].shape == (4, SEQ + 1)
    lengths = np.concatenate([b["loss_mask"].sum(1) for b in batches])
    assert lengths.tolist() == [min(3 * (i % 4), SEQ + 1) for i in range(12)]
    ids = np.concatenate([b["input_ids"] for b in batches])
    assert (ids[~np.concatenate([b["loss_mask"] for b in batches])] == 0).all()


def test_shuffle_off_reads_in_order_and_on_permutes(tmp_path):
    manifest = make_text(tmp_path, "a", 24)
    ordered = TextDataParams(dataset_manifest=[manifest], seq_len=SEQ, shuffle=False)
    assert first_ids(build_train_iterator(ordered, global_batch_size=4, num_batches=6)).tolist() == list(range(24))
    shuffled = first_ids(build_train_iterator(ordered.replace(shuffle=True), global_batch_size=4, num_batches=6))
    assert sorted(shuffled.tolist()) == list(range(24)) and shuffled.tolist() != list(range(24))


def test_weighted_mixing_proportions(tmp_path):
    m1, m2 = _two_datasets(tmp_path)
    data = TextDataParams(dataset_manifest=[m1, m2], dataset_weighting=[1.0, 3.0], seq_len=SEQ)
    ids = first_ids(build_train_iterator(data, global_batch_size=8, num_batches=20))
    from_a = ((ids >= 1000) & (ids < 5000)).mean()
    assert abs(from_a - 0.25) < 0.05
    assert len(set(ids.tolist())) == len(ids)  # no sample repeated within an epoch


def test_deterministic_and_seeded(tmp_path):
    m1, m2 = _two_datasets(tmp_path)
    data = TextDataParams(dataset_manifest=[m1, m2], dataset_weighting=[1, 1], seq_len=SEQ, seed=7)
    a = first_ids(build_train_iterator(data, global_batch_size=8, num_batches=5))
    b = first_ids(build_train_iterator(data, global_batch_size=8, num_batches=5))
    c = first_ids(build_train_iterator(data.replace(seed=8), global_batch_size=8, num_batches=5))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_shards_concatenate_to_the_global_batch(tmp_path, process_count):
    m1, m2 = _two_datasets(tmp_path, 30, 50)
    data = TextDataParams(
        dataset_manifest=[m1, m2], dataset_weighting=[2, 3], seq_len=SEQ, allow_multiple_epochs=True, num_workers=2
    )
    single = list(build_train_iterator(data, global_batch_size=8, num_batches=12))
    hosts = [
        list(
            build_train_iterator(
                data, global_batch_size=8, num_batches=12, process_index=p, process_count=process_count
            )
        )
        for p in range(process_count)
    ]
    for t in range(12):
        for key in ("input_ids", "loss_mask"):
            parts = [hosts[p][t][key] for p in range(process_count)]
            assert parts[0].shape[0] == 8 // process_count
            np.testing.assert_array_equal(np.concatenate(parts), single[t][key])


def test_state_restores_exact_continuation(tmp_path):
    m1, m2 = _two_datasets(tmp_path, 40, 40)
    data = TextDataParams(
        dataset_manifest=[m1, m2], dataset_weighting=[1, 2], seq_len=SEQ, allow_multiple_epochs=True, prefetch_factor=3
    )
    it = build_train_iterator(data, global_batch_size=6, num_batches=30)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    rest = [next(it) for _ in range(5)]
    again = build_train_iterator(data, global_batch_size=6, num_batches=30)
    again.set_state(state)
    for x, y in zip(rest, [next(again) for _ in range(5)], strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    # The position is global: a run resumed on 3 hosts continues with the same global batches.
    hosts = [
        build_train_iterator(data, global_batch_size=6, num_batches=30, process_index=p, process_count=3)
        for p in range(3)
    ]
    for h in hosts:
        h.set_state(state)
    np.testing.assert_array_equal(np.concatenate([next(h)["input_ids"] for h in hosts]), rest[0]["input_ids"])
    with pytest.raises(DataError, match="seed"):
        build_train_iterator(data.replace(seed=1), global_batch_size=6, num_batches=30).set_state(state)
    it.set_state(it.get_state() | {"next_batch": 30})
    with pytest.raises(StopIteration):
        next(it)


def test_not_enough_data_and_multiple_epochs(tmp_path):
    manifest = make_text(tmp_path, "a", 10)
    data = TextDataParams(dataset_manifest=[manifest], seq_len=SEQ)
    with pytest.raises(DataError, match=r"(?s)need 12 samples.*holds 10.*allow_multiple_epochs.*total_train_samples"):
        build_train_iterator(data, global_batch_size=4, num_batches=3)
    ids = first_ids(build_train_iterator(data.replace(allow_multiple_epochs=True), global_batch_size=5, num_batches=4))
    epochs = ids.reshape(2, 10)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10))
    assert epochs[0].tolist() != epochs[1].tolist()  # reshuffled per epoch


def test_untokenized_without_tokenizer_field_errors(tmp_path):
    raw = [{"__key__": "0001", "json": b"one two"}]
    manifest = write_shards(str(tmp_path / "u"), raw, samples_per_shard=1)
    data = TextDataParams(dataset_manifest=[manifest], dataset_modality=["text_untokenized"], seq_len=SEQ)
    with pytest.raises(DataError, match="tokenizer"):
        build_train_iterator(data, global_batch_size=1, num_batches=1)


# ---------------------------------------------------------------- bundled tiny data


@pytest.mark.skipif(not os.path.isdir(TINY), reason="tiny_data/ not generated")
def test_bundled_tiny_data_matches_generator(tmp_path):
    paths = make_tiny_datasets(str(tmp_path))
    for sub in ("text", "text_untokenized", "tokenizer"):
        for name in sorted(os.listdir(os.path.join(TINY, sub))):
            with open(os.path.join(TINY, sub, name), "rb") as f, open(os.path.join(tmp_path, sub, name), "rb") as g:
                assert f.read() == g.read(), f"tiny_data/{sub}/{name} differs from the generator's output"
    text_dirs = [os.path.join(TINY, sub) for sub in ("text", "text_untokenized", "tokenizer")]
    total = sum(os.path.getsize(os.path.join(r, f)) for d in text_dirs for r, _, fs in os.walk(d) for f in fs)
    assert total < 2_000_000  # the VLM data (shapes/, vlm_processor/) is checked in test_image_caption_data.py
    vocab_len, pad = tokenizer_info(
        TextUntokenizedDataParams(dataset_manifest=["m"], tokenizer=os.path.join(TINY, "tokenizer"))
    )
    assert vocab_len < 300 and pad == 0
    text = ShardDataSource(paths["text"])
    ids = json.loads(gzip.decompress(text[0]["json.gz"]))
    assert len(ids) == 129 and max(ids) < vocab_len and 2 in ids  # eos separators
    data = TextUntokenizedDataParams(
        dataset_manifest=[os.path.join(TINY, "text_untokenized", "manifest.jsonl")],
        tokenizer=os.path.join(TINY, "tokenizer"),
        seq_len=128,
    )
    batch = next(build_train_iterator(data, global_batch_size=4, num_batches=1))
    assert batch["input_ids"].shape == (4, 129) and (batch["input_ids"][batch["loss_mask"]] != 1).all()  # no [UNK]
