"""The streaming reader (data.streaming): start-up reads only manifests, batches fixed by seed and host count,
hosts read disjoint shards, exact resume from the saved state, lazy num_sequences checks, shards that disappear
mid-run, and the same batches from a loopback S3 server (moto) that fails some requests."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import socket

import numpy as np
import pytest

from tests.fixtures.paths import PROCESSOR, TINY
from tests.fixtures.robotics import REACH_TRAIN, reach_data
from vla_foundry_jax import paths
from vla_foundry_jax.data import DataError, build_train_iterator, streaming, write_shards
from vla_foundry_jax.params import ImageCaptionDataParams, TextDataParams

SEQ = 4
PER_SHARD = 7


def _gz(ids: list[int]) -> bytes:
    return gzip.compress(json.dumps(ids).encode(), mtime=0)


def make_text(root, name: str, num_shards: int, *, base: int = 0) -> str:
    """``num_shards`` shards of PER_SHARD samples; sample i is ``[base + i] * (SEQ + 1)`` (a row names its sample)."""
    n = num_shards * PER_SHARD
    samples = [{"__key__": f"{i:06d}", "json.gz": _gz([base + i] * (SEQ + 1))} for i in range(n)]
    return write_shards(str(root / name), samples, samples_per_shard=PER_SHARD)


def text(manifests, **kw) -> TextDataParams:
    base = dict(
        dataset_manifest=list(manifests),
        seq_len=SEQ,
        streaming=True,
        shuffle_buffer_size=12,
        shuffle_initial=4,
        num_workers=2,
    )
    return TextDataParams(**{**base, **kw})


def ids(batches) -> np.ndarray:
    return np.concatenate([b["input_ids"][:, 0] for b in batches])


def equal_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(autouse=True)
def _fast_shard_retries(monkeypatch):
    monkeypatch.setattr(streaming, "_MISSING_BACKOFF_S", 0.01)


# ---------------------------------------------------------------- start-up, determinism, hosts


def test_startup_reads_no_shard(tmp_path):
    manifest = make_text(tmp_path, "t", 40)
    for name in os.listdir(tmp_path / "t"):
        if name.endswith(".tar"):
            os.remove(tmp_path / "t" / name)  # start-up must not notice: it reads the manifest only
    it = build_train_iterator(text([manifest]), global_batch_size=4, num_batches=5)
    assert it.dataset_sizes == [40 * PER_SHARD]
    with pytest.raises(DataError, match=r"ran out at batch 0 .*280 bad sample"):  # the first batch finds nothing
        next(it)


def test_batches_fixed_by_seed_not_by_workers_and_one_epoch_is_a_permutation(tmp_path):
    manifest = make_text(tmp_path, "t", 10)
    data = text([manifest])
    first = list(build_train_iterator(data, global_batch_size=5, num_batches=14))
    assert sorted(ids(first).tolist()) == list(range(70))  # every sample once
    assert ids(first).tolist() != list(range(70))  # shuffled
    for workers in (0, 4):
        equal_batches(
            first, list(build_train_iterator(data.replace(num_workers=workers), global_batch_size=5, num_batches=14))
        )
    other = list(build_train_iterator(data.replace(seed=7), global_batch_size=5, num_batches=14))
    assert ids(other).tolist() != ids(first).tolist()
    ordered = list(build_train_iterator(data.replace(shuffle=False), global_batch_size=5, num_batches=14))
    assert ids(ordered).tolist() == list(range(70))


def test_two_hosts_read_disjoint_whole_shards(tmp_path):
    manifest = make_text(tmp_path, "t", 10)
    data = text([manifest])
    hosts = [
        ids(build_train_iterator(data, global_batch_size=10, num_batches=7, process_index=p, process_count=2))
        for p in (0, 1)
    ]
    shards = [set((h // PER_SHARD).tolist()) for h in hosts]
    assert len(shards[0]) == len(shards[1]) == 5 and not shards[0] & shards[1]
    for h, s in zip(hosts, shards, strict=True):  # each host read its shards whole
        assert sorted(h.tolist()) == sorted(i for k in s for i in range(k * PER_SHARD, (k + 1) * PER_SHARD))
    again = ids(build_train_iterator(data, global_batch_size=10, num_batches=7, process_index=1, process_count=2))
    np.testing.assert_array_equal(again, hosts[1])
    with pytest.raises(DataError, match="3 shard"):
        build_train_iterator(
            text([make_text(tmp_path, "u", 3)]), global_batch_size=4, num_batches=1, process_index=0, process_count=4
        )


def test_not_enough_data_and_missing_num_sequences(tmp_path):
    manifest = make_text(tmp_path, "t", 2)
    with pytest.raises(DataError, match=r"Not enough training data.*allow_multiple_epochs"):
        build_train_iterator(text([manifest]), global_batch_size=4, num_batches=4)
    assert (
        len(
            list(build_train_iterator(text([manifest], allow_multiple_epochs=True), global_batch_size=4, num_batches=9))
        )
        == 9
    )
    with open(manifest, "w") as f:
        f.write('{"shard": "shard-0000"}\n')
    with pytest.raises(DataError, match="num_sequences"):
        build_train_iterator(text([manifest]), global_batch_size=2, num_batches=1)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("process_index", [0, 1])
def test_resume_mid_epoch_continues_exactly(tmp_path, process_index):
    a = make_text(tmp_path, "a", 6)
    b = make_text(tmp_path, "b", 4, base=1000)
    data = text([a, b], dataset_weighting=[2.0, 1.0], allow_multiple_epochs=True, num_workers=3)
    hosts = dict(global_batch_size=6, process_index=process_index, process_count=2)
    full = list(build_train_iterator(data, num_batches=25, **hosts))
    assert (ids(full) >= 1000).any() and (ids(full) < 1000).any()  # mixed
    it = build_train_iterator(data, num_batches=25, **hosts)
    head = [next(it) for _ in range(9)]  # 27 of 42 samples of this host's first epoch
    state = json.loads(json.dumps(it.get_state()))
    resumed = build_train_iterator(data, num_batches=25, **hosts)
    resumed.set_state(state)
    equal_batches(full, head + list(resumed))
    with pytest.raises(DataError, match="seed"):
        build_train_iterator(data.replace(seed=3), num_batches=25, **hosts).set_state(state)
    with pytest.raises(DataError, match="process_count"):
        build_train_iterator(data, num_batches=25, global_batch_size=6, process_index=0, process_count=3).set_state(
            state
        )
    random_access = build_train_iterator(data.replace(streaming=False), num_batches=25, global_batch_size=6)
    with pytest.raises(DataError, match=r"data\.streaming"):
        build_train_iterator(data, num_batches=25, **hosts).set_state(random_access.get_state())


def test_robotics_and_image_caption_stream_and_resume():
    for data in (
        reach_data(REACH_TRAIN, streaming=True, num_workers=2, shuffle_buffer_size=64, shuffle_initial=8),
        ImageCaptionDataParams(
            dataset_manifest=[os.path.join(TINY, "shapes", "train", "manifest.jsonl")],
            processor=PROCESSOR,
            img_num_tokens=2,
            image_size=32,
            seq_len=16,
            streaming=True,
            num_workers=2,
            shuffle_buffer_size=64,
            shuffle_initial=8,
        ),
    ):
        full = list(build_train_iterator(data, global_batch_size=4, num_batches=4))
        reference = next(build_train_iterator(data.replace(streaming=False), global_batch_size=4, num_batches=1))
        assert {k: (v.shape, v.dtype) for k, v in full[0].items()} == {
            k: (v.shape, v.dtype) for k, v in reference.items()
        }
        it = build_train_iterator(data, global_batch_size=4, num_batches=4)
        head = [next(it)]
        state = json.loads(json.dumps(it.get_state()))
        resumed = build_train_iterator(data, global_batch_size=4, num_batches=4)
        resumed.set_state(state)
        equal_batches(full, head + list(resumed))


# ---------------------------------------------------------------- bad input


def test_num_sequences_mismatch_warns_when_the_shard_is_read(tmp_path, caplog):
    manifest = make_text(tmp_path, "t", 3)
    lines = open(manifest).read().splitlines()
    lines[1] = json.dumps({"shard": "shard-0001", "num_sequences": 9})
    with open(manifest, "w") as f:
        f.write("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        it = build_train_iterator(text([manifest], shuffle=False), global_batch_size=3, num_batches=7)
        assert not caplog.records  # nothing read yet
        got = ids(it)
    warned = [r.getMessage() for r in caplog.records if "num_sequences" in r.getMessage()]
    assert len(warned) == 1 and "shard-0001.tar holds 7 samples" in warned[0] and "= 9" in warned[0]
    assert got.tolist() == list(range(21))


def _host_order(manifest: str, data: TextDataParams) -> list[int]:
    it = build_train_iterator(data, global_batch_size=4, num_batches=1)
    return it._streams[0].stream.host_shards(0)


def test_shard_deleted_mid_run_is_retried_then_skipped_and_counted(tmp_path, caplog):
    manifest = make_text(tmp_path, "t", 10)
    data = text([manifest], max_bad_sample_fraction=0.2)
    full = list(build_train_iterator(data, global_batch_size=4, num_batches=14))
    last = tmp_path / "t" / f"shard-{_host_order(manifest, data)[-1]:04d}.tar"
    keep = tmp_path / "kept.tar"

    # deleted, then back before the second attempt: retried, nothing skipped, the same batches
    class PutBack(logging.Handler):
        retried = 0

        def emit(self, record):
            if "retrying" in record.getMessage() and not last.exists():
                PutBack.retried += 1
                shutil.copy(keep, last)

    shutil.copy(last, keep)
    it = build_train_iterator(data, global_batch_size=4, num_batches=14)
    head = [next(it)]
    os.remove(last)
    handler = PutBack()
    logging.getLogger(streaming.__name__).addHandler(handler)
    try:
        rest = list(it)
    finally:
        logging.getLogger(streaming.__name__).removeHandler(handler)
    equal_batches(full, head + rest)
    assert PutBack.retried == 1 and it.bad_samples == 0

    # deleted for good: skipped after the retries, counted as its num_sequences, warned once
    it = build_train_iterator(data, global_batch_size=4, num_batches=14)
    head = [next(it)]
    os.remove(last)
    with caplog.at_level(logging.WARNING):
        rest = list(it)  # 63 samples still cover the 56 rows
    assert len(rest) == 13 and it.bad_samples == PER_SHARD
    assert set(ids(rest).tolist()).isdisjoint(
        range(int(last.stem[-4:]) * PER_SHARD, (int(last.stem[-4:]) + 1) * PER_SHARD)
    )
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping shard")]
    assert (
        len(skipped) == 1
        and last.name in skipped[0]
        and f"after {streaming.MISSING_SHARD_ATTEMPTS} attempts" in skipped[0]
    )

    # past the bad-sample budget the run stops, naming the field
    shutil.copy(keep, last)
    it = build_train_iterator(data.replace(max_bad_sample_fraction=0.0), global_batch_size=4, num_batches=14)
    next(it)
    os.remove(last)
    with pytest.raises(DataError, match="max_bad_sample_fraction"):
        list(it)


# ---------------------------------------------------------------- S3 (moto server) with injected faults


@pytest.mark.parametrize("mode", ["500", "drop"])
def test_s3_with_failing_requests_gives_the_same_batches(tmp_path, s3, mode):
    manifest = make_text(tmp_path, "t", 8)
    bucket = s3.bucket()
    for name in sorted(os.listdir(tmp_path / "t")):
        with open(tmp_path / "t" / name, "rb") as f:
            paths.write_bytes(f"{bucket}/t/{name}", f.read())
    local = text([manifest], allow_multiple_epochs=True)
    remote = local.replace(dataset_manifest=[f"{bucket}/t/manifest.jsonl"])
    expected = list(build_train_iterator(local, global_batch_size=4, num_batches=20))

    proxy = s3.faults(0.25, mode)  # a quarter of the requests fail (seeded draws)
    it = build_train_iterator(remote, global_batch_size=4, num_batches=20)
    assert proxy.count <= 4  # start-up: the manifest (its size and its bytes, a failed request retried), no shard
    head = [next(it) for _ in range(8)]
    state = json.loads(json.dumps(it.get_state()))
    rest = list(it)
    equal_batches(expected, head + rest)
    assert proxy.failed >= 4 and it.bad_samples == 0
    resumed = build_train_iterator(remote, global_batch_size=4, num_batches=20)
    resumed.set_state(state)
    equal_batches(expected[8:], list(resumed))
    for done in (it, resumed):
        done.close(wait=True)


# ---------------------------------------------------------------- training: the checkpointed state resumes exactly


def test_training_resumed_from_a_checkpoint_matches_the_uninterrupted_losses(tmp_path):
    from tests.fixtures.runs import logged_losses, tiny_experiment
    from vla_foundry_jax.training.loop import train

    def experiment(out: str):
        exp = tiny_experiment(out, steps=6)
        data = exp.data.replace(streaming=True, shuffle_buffer_size=16, shuffle_initial=4, num_workers=2)
        return exp.replace(data=data)

    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    train(experiment(straight))
    shutil.copytree(straight, cut)  # then cut back to how it was right after the step-3 save
    shutil.rmtree(os.path.join(cut, "checkpoints", "6"))
    metrics = os.path.join(cut, "metrics.jsonl")
    lines = [x for x in open(metrics).read().splitlines() if json.loads(x)["step"] <= 3]
    with open(metrics, "w") as f:
        f.write("\n".join(lines) + "\n")
    train(experiment(cut))
    a, b = logged_losses(straight), logged_losses(cut)
    assert sorted(b) == list(range(1, 7)) and sum(1 for _ in open(metrics)) >= 6
    for step in range(1, 7):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_two_processes_gather_each_others_iterator_state():
    from tests.fixtures.multidevice import finish, start

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    code = (
        "import json, sys, jax\n"
        "i = int(sys.argv[1])\n"
        f"jax.distributed.initialize('127.0.0.1:{port}', num_processes=2, process_id=i)\n"
        "from vla_foundry_jax.data.streaming import gather_host_states\n"
        "print(json.dumps(gather_host_states(i, {'host': i, 'buffer': list(range(5 * i))})))\n"
    )
    import sys

    procs = [start([sys.executable, "-c", code, str(i)]) for i in range(2)]
    outs = [json.loads(finish(p, timeout=120).stdout.strip().splitlines()[-1]) for p in procs]
    expected = {"0": {"host": 0, "buffer": []}, "1": {"host": 1, "buffer": [0, 1, 2, 3, 4]}}
    assert outs == [expected, expected]


def test_gcs_emulator_gives_the_local_batches(tmp_path, gcs):
    manifest = make_text(tmp_path, "t", 4)
    bucket = gcs.bucket()
    for name in sorted(os.listdir(tmp_path / "t")):
        with open(tmp_path / "t" / name, "rb") as f:
            paths.write_bytes(f"{bucket}/t/{name}", f.read())
    local = text([manifest], allow_multiple_epochs=True)
    remote = local.replace(dataset_manifest=[f"{bucket}/t/manifest.jsonl"])
    expected = list(build_train_iterator(local, global_batch_size=4, num_batches=10))
    it = build_train_iterator(remote, global_batch_size=4, num_batches=10)
    equal_batches(expected, list(it))
    it.close(wait=True)
