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
    assert it.dataset_sizes == [40 * PER_SHARD] and it.num_streams == 4  # the largest divisor of 4 up to 64
    # the first batch finds nothing: stream 0's 10 shards were each retried, skipped and counted
    with pytest.raises(DataError, match=r"ran out at batch 0 .*stream 0 of 4 .*70 bad sample"):
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
    # unshuffled, 5 streams of one row each: batch n holds the n-th sample of every stream (stream s: shards s, s + 5)
    expected = [(s + 5 * (n // PER_SHARD)) * PER_SHARD + n % PER_SHARD for n in range(14) for s in range(5)]
    assert ids(ordered).tolist() == expected
    one = build_train_iterator(data.replace(shuffle=False, num_streams=1), global_batch_size=5, num_batches=14)
    assert ids(one).tolist() == list(range(70))  # one stream: manifest order


def test_hosts_dividing_the_streams_read_disjoint_whole_shards(tmp_path):
    manifest = make_text(tmp_path, "t", 10)
    data = text([manifest])  # global batch 10, 10 shards: 10 streams, 5 per host
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
    small = text([make_text(tmp_path, "u", 3)])
    with pytest.raises(DataError, match=r"3 shard\(s\) for data.num_streams = 4"):
        build_train_iterator(small.replace(num_streams=4), global_batch_size=4, num_batches=1)
    with pytest.raises(DataError, match=r"num_streams = 3 does not divide the global batch size 4"):
        build_train_iterator(small.replace(num_streams=3), global_batch_size=4, num_batches=1)


def global_batches(data, *, hosts: int, num_batches: int, global_batch_size: int = 8, state=None, skip: int = 0):
    """The global batches of ``hosts`` simulated hosts (each host's rows, in host order), batches ``skip`` on (from
    ``state`` when given), and the hosts' iterators."""
    its = [
        build_train_iterator(
            data, global_batch_size=global_batch_size, num_batches=num_batches, process_index=p, process_count=hosts
        )
        for p in range(hosts)
    ]
    if state is not None:
        for it in its:
            it.set_state(state)
    per_host = [[next(it) for _ in range(skip, num_batches)] for it in its]
    return [
        {k: np.concatenate([h[i][k] for h in per_host]) for k in per_host[0][i]} for i in range(len(per_host[0]))
    ], its


def merged_state(its) -> dict:
    """What ``get_state`` gathers across real processes: every host's streams in one state."""
    state = json.loads(json.dumps(its[0].get_state()))
    for it in its[1:]:
        state["streams"].update(json.loads(json.dumps(it.get_state()))["streams"])
    return state


def mixed_data(tmp_path) -> TextDataParams:
    """Two weighted datasets (8 and 6 shards, global batch 8: 4 streams); sample 20 of the first is corrupt."""
    a = make_text(tmp_path, "a", 8)
    with open(tmp_path / "a" / "shard-0002.tar", "rb") as f:  # sample 20 lives there (7 per shard)
        raw = f.read()
    corrupt = raw.replace(_gz([20] * (SEQ + 1)), b"x" * len(_gz([20] * (SEQ + 1))))
    assert corrupt != raw
    with open(tmp_path / "a" / "shard-0002.tar", "wb") as f:
        f.write(corrupt)
    b = make_text(tmp_path, "b", 6, base=1000)
    return text(
        [a, b], dataset_weighting=[2.0, 1.0], allow_multiple_epochs=True, num_workers=3, max_bad_sample_fraction=0.1
    )


def test_global_batches_and_bad_sample_counts_do_not_depend_on_the_host_count(tmp_path):
    data = mixed_data(tmp_path)
    one, its = global_batches(data, hosts=1, num_batches=16)
    assert its[0].num_streams == 4 and its[0].bad_samples == 1  # largest divisor of 8 up to the 6 shards of b
    assert (ids(one) >= 1000).any() and (ids(one) < 1000).any() and 20 not in ids(one)
    for hosts in (2, 4, 8):  # 8 hosts: each stream's rows split between two hosts, both read it
        got, its = global_batches(data, hosts=hosts, num_batches=16)
        equal_batches(one, got)
        assert sum(it.bad_samples for it in its) == 1, hosts
    # a host count that divides neither way: 12 rows, 4 streams of 3, 3 hosts of 4 rows (hosts share streams)
    one, _ = global_batches(data, hosts=1, num_batches=6, global_batch_size=12)
    three, _ = global_batches(data, hosts=3, num_batches=6, global_batch_size=12)
    equal_batches(one, three)


@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 4), (4, 8)])
def test_state_saved_on_some_hosts_resumes_on_others(tmp_path, saved, resumed):
    data = mixed_data(tmp_path)
    full, _ = global_batches(data, hosts=1, num_batches=20)
    its = [
        build_train_iterator(data, global_batch_size=8, num_batches=20, process_index=p, process_count=saved)
        for p in range(saved)
    ]
    head = [[next(it) for _ in range(9)] for it in its]  # mid-epoch, the corrupt sample behind
    head = [{k: np.concatenate([h[i][k] for h in head]) for k in head[0][i]} for i in range(9)]
    state = merged_state(its)
    assert sorted(state["streams"], key=int) == ["0", "1", "2", "3"] and state["next_batch"] == 9
    rest, its = global_batches(data, hosts=resumed, num_batches=20, state=state, skip=9)
    equal_batches(full, head + rest)
    assert sum(it.bad_samples for it in its) == 1  # restored with the streams that counted it


def test_num_streams_is_validated():
    from vla_foundry_jax.params import ParamsError

    with pytest.raises(ParamsError, match=r"text.num_streams = 0: .*at least 1"):
        text(["m.jsonl"], num_streams=0).validate()
    with pytest.raises(ParamsError, match=r"text.num_streams = 4: only the streaming reader .*streaming = True"):
        text(["m.jsonl"], num_streams=4, streaming=False).validate()


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


def test_resume_mid_epoch_continues_exactly(tmp_path):
    a = make_text(tmp_path, "a", 6)
    b = make_text(tmp_path, "b", 4, base=1000)
    data = text([a, b], dataset_weighting=[2.0, 1.0], allow_multiple_epochs=True, num_workers=3)
    hosts = dict(global_batch_size=6, process_index=0, process_count=2)  # 3 streams of 2 rows; stream 1 is shared
    full, _ = global_batches(data, hosts=2, num_batches=25, global_batch_size=6)
    assert (ids(full) >= 1000).any() and (ids(full) < 1000).any()  # mixed
    its = [build_train_iterator(data, num_batches=25, **{**hosts, "process_index": p}) for p in (0, 1)]
    head = [[next(it) for _ in range(9)] for it in its]  # 27 of 42 samples of the first epoch of a's streams
    head = [{k: np.concatenate([h[i][k] for h in head]) for k in head[0][i]} for i in range(9)]
    state = merged_state(its)
    rest, _ = global_batches(data, hosts=2, num_batches=25, global_batch_size=6, state=state, skip=9)
    equal_batches(full, head + rest)
    with pytest.raises(DataError, match=r"no position for stream\(s\) \[1\]"):  # host 1's part of the state only
        build_train_iterator(data, num_batches=25, **{**hosts, "process_index": 1}).set_state(its[1].get_state())
    with pytest.raises(DataError, match="seed"):
        build_train_iterator(data.replace(seed=3), num_batches=25, **hosts).set_state(state)
    with pytest.raises(DataError, match=r"num_streams=3 vs 2; set data.num_streams = 3"):
        build_train_iterator(data.replace(num_streams=2), num_batches=25, **hosts).set_state(state)
    with pytest.raises(DataError, match=r"version 1 .*no longer depend on the host count"):
        build_train_iterator(data, num_batches=25, **hosts).set_state({**state, "version": 1})
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
        it = build_train_iterator(text([manifest], shuffle=False, num_streams=1), global_batch_size=3, num_batches=7)
        assert not caplog.records  # nothing read yet
        got = ids(it)
    warned = [r.getMessage() for r in caplog.records if "num_sequences" in r.getMessage()]
    assert len(warned) == 1 and "shard-0001.tar holds 7 samples" in warned[0] and "= 9" in warned[0]
    assert got.tolist() == list(range(21))


def _host_order(manifest: str, data: TextDataParams) -> list[int]:
    it = build_train_iterator(data, global_batch_size=4, num_batches=1)
    return it._streams[0].datasets[0].stream.stream_shards(0)


def test_shard_deleted_mid_run_is_retried_then_skipped_and_counted(tmp_path, caplog):
    manifest = make_text(tmp_path, "t", 10)
    data = text([manifest], max_bad_sample_fraction=0.2, num_streams=1)  # one stream: its last shard is read last
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_training_saved_on_two_processes_resumes_on_one_with_the_same_losses(tmp_path):
    """A real two-process streaming run (jax.distributed on loopback, one CPU device each), cut back to its step-3
    checkpoint (as if killed right after that save), continued by one process reading all four streams: steps
    4-6 log the two-process run's losses."""
    from tests.fixtures.multidevice import finish, start
    from tests.fixtures.runs import logged_losses, tiny_train_command

    stream = [
        "text_untokenized.streaming = True",  # the bundled text: 4 shards, global batch 8 -> 4 streams
        "text_untokenized.shuffle_buffer_size = 16",
        "text_untokenized.shuffle_initial = 4",
        "text_untokenized.num_workers = 2",
    ]
    two = ["distributed.fsdp_parallelism = -1", "distributed.data_parallelism = 1", "hparams.per_gpu_batch_size = 4"]
    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    port = _free_port()
    hosts = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [start([*tiny_train_command(straight, 6, stream + two), *hosts, f"--process_id={i}"]) for i in (0, 1)]
    logs = [finish(p, timeout=420).stderr for p in procs]
    assert "process 1 of 2" in logs[1]
    shutil.copytree(straight, cut)  # then cut back to how it was right after the step-3 save
    shutil.rmtree(os.path.join(cut, "checkpoints", "6"))
    metrics = os.path.join(cut, "metrics.jsonl")
    lines = [x for x in open(metrics).read().splitlines() if json.loads(x)["step"] <= 3]
    with open(metrics, "w") as f:
        f.write("\n".join(lines) + "\n")
    resumed = finish(start(tiny_train_command(cut, 6, stream)), timeout=420).stderr
    assert "resuming from" in resumed
    a, b = logged_losses(straight), logged_losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in range(4, 7):  # one device instead of two: only the reduction order differs
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


def test_two_processes_gather_each_others_iterator_state():
    from tests.fixtures.multidevice import finish, start

    port = _free_port()
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
