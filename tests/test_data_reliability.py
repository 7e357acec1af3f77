"""Loud instead of silent (issue 11): real corrupted files for every modality follow one bad-sample policy (skip,
warn with shard and key, count, stop past data.max_bad_sample_fraction); manifests that disagree with their
shards; params that were accepted and ignored or nonsensical; no spurious gin error lines; requirements."""

from __future__ import annotations

import ast
import gzip
import io
import json
import logging
import os
import re
import shutil
import sys

import numpy as np
import pytest

from tests.fixtures.paths import PROCESSOR, ROOT, TINY
from vla_foundry_jax.data import DataError, ShardDataSource, build_eval_iterator, build_train_iterator, write_shards
from vla_foundry_jax.data.shards import BadSampleError
from vla_foundry_jax.data.text import TextTransform, load_tokenizer
from vla_foundry_jax.params import (
    HyperParams,
    ImageCaptionDataParams,
    NormalizationParams,
    ParamsError,
    RoboticsDataParams,
    TextDataParams,
    TextUntokenizedDataParams,
    TrainExperimentParams,
    TransformerParams,
    VLMParams,
)
from vla_foundry_jax.params.train_params import check_sequence_fits, check_warmup

SEQ = 8
TOKENIZER = os.path.join(TINY, "tokenizer")
REACH = os.path.join(TINY, "reach", "train")


def _gz(ids: list[int]) -> bytes:
    return gzip.compress(json.dumps(ids).encode(), mtime=0)


def _text_samples(n: int, bad: dict[int, bytes]) -> list[dict[str, bytes]]:
    """Sample i holds ``[i] * (SEQ + 1)`` (so a row names its sample); ``bad[i]`` replaces its json.gz bytes."""
    return [{"__key__": f"{i:06d}", "json.gz": bad.get(i, _gz([i] * (SEQ + 1)))} for i in range(n)]


def _first_ids(batches) -> list[int]:
    return np.concatenate([b["input_ids"][:, 0] for b in batches]).tolist()


def _bad_text(tmp_path, name: str = "t") -> str:
    """8 text samples in shards of 4: sample 2 is a truncated gzip, sample 5 is not gzip at all."""
    truncated = _gz([2] * (SEQ + 1))[:-9]
    return write_shards(str(tmp_path / name), _text_samples(8, {2: truncated, 5: b"not gzip"}), samples_per_shard=4)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _skips(caplog, tmp_path) -> list[str]:
    """This test's skip warnings: an earlier test's read-ahead thread on the same worker may still be logging."""
    return [m for m in _warnings(caplog) if m.startswith("Skipping bad sample") and str(tmp_path) in m]


# ---------------------------------------------------------------- text: corrupt gzip


def test_truncated_gzip_names_shard_and_key_not_a_bare_eoferror(tmp_path):
    manifest = _bad_text(tmp_path)
    raw = ShardDataSource(manifest)[2]
    with pytest.raises(BadSampleError, match=r"'000002' of shard 'shard-0000'.*gzip JSON list.*EOFError") as e:
        TextTransform(SEQ)(raw, np.random.default_rng(0))
    assert (e.value.shard, e.value.key) == ("shard-0000", "000002")


def test_text_bad_samples_are_skipped_counted_and_warned(tmp_path, caplog):
    manifest = _bad_text(tmp_path)
    data = TextDataParams(dataset_manifest=[manifest], seq_len=SEQ, shuffle=False, max_bad_sample_fraction=0.25)
    caplog.set_level(logging.WARNING)
    it = build_train_iterator(data, global_batch_size=4, num_batches=2)
    first = next(it)
    assert set(first) == {"input_ids", "loss_mask"}  # the per-row counts and notes are popped
    assert it.bad_samples == 1
    second = next(it)
    # each bad sample is replaced by the next good one: full batches, nothing of the corrupt bytes
    assert _first_ids([first, second]) == [0, 1, 3, 3, 4, 6, 6, 7]
    assert it.bad_samples == 2 and it.corrupt_images_skipped == 2
    stats = it.bad_sample_stats
    assert stats["bad_samples"] == 2 and stats["bad_sample_fraction"] == 2 / 8
    shard0, shard1 = (os.path.join(str(tmp_path / "t"), f"shard-000{s}.tar") for s in (0, 1))
    assert stats["bad_samples_by_shard"] == {shard0: 1, shard1: 1}
    logged = _warnings(caplog)
    skips = _skips(caplog, tmp_path)
    assert len(skips) == 2  # one line per shard
    assert any("'000002'" in m and shard0 in m for m in skips) and any("'000005'" in m and shard1 in m for m in skips)
    assert any("2 bad sample(s) skipped" in m for m in logged)  # the summary at the end


def test_skips_are_deterministic_and_resume_with_their_count(tmp_path):
    manifest = _bad_text(tmp_path)
    data = TextDataParams(dataset_manifest=[manifest], seq_len=SEQ, max_bad_sample_fraction=0.5, seed=3)
    full = list(build_train_iterator(data, global_batch_size=2, num_batches=4))
    again = build_train_iterator(data, global_batch_size=2, num_batches=4)
    assert _first_ids(again) == _first_ids(full) and again.bad_samples == 2
    it = build_train_iterator(data, global_batch_size=2, num_batches=4)
    head = [next(it), next(it)]
    state = json.loads(json.dumps(it.get_state()))
    resumed = build_train_iterator(data, global_batch_size=2, num_batches=4)
    resumed.set_state(state)
    assert resumed.bad_samples == it.bad_samples == state["bad_samples"]
    assert _first_ids([*head, *resumed]) == _first_ids(full) and resumed.bad_samples == 2


def test_threshold_error_names_the_field_shard_and_reason(tmp_path):
    manifest = _bad_text(tmp_path)
    data = TextDataParams(dataset_manifest=[manifest], seq_len=SEQ, shuffle=False)  # default fraction 0.01
    it = build_train_iterator(data, global_batch_size=4, num_batches=2)
    with pytest.raises(DataError) as e:
        next(it)
    msg = str(e.value)
    assert "data.max_bad_sample_fraction = 0.01" in msg and "text.max_bad_sample_fraction" in msg
    assert os.path.join(str(tmp_path / "t"), "shard-0000.tar") in msg and "'000002'" in msg
    strict = data.replace(max_bad_sample_fraction=0.0, shuffle=True)
    with pytest.raises(DataError, match=r"\d bad samples were skipped.*max_bad_sample_fraction = 0\.0 "):
        list(build_train_iterator(strict, global_batch_size=4, num_batches=2))
    # 2 of 8 samples bad: 0.25 is enough, 0.2 is not (the budget is the fraction of the samples the run reads)
    assert len(
        list(build_train_iterator(data.replace(max_bad_sample_fraction=0.25), global_batch_size=4, num_batches=2))
    )
    with pytest.raises(DataError, match="max_bad_sample_fraction"):
        list(build_train_iterator(data.replace(max_bad_sample_fraction=0.2), global_batch_size=4, num_batches=2))


def test_a_broken_dataset_stops_at_once(tmp_path):
    samples = _text_samples(40, {i: b"\x1f\x8b garbage" for i in range(40)})
    manifest = write_shards(str(tmp_path / "broken"), samples, samples_per_shard=40)
    data = TextDataParams(dataset_manifest=[manifest], seq_len=SEQ, max_bad_sample_fraction=1.0)
    with pytest.raises(DataError, match=r"(?s)17 consecutive samples.*are bad.*dataset_modality.*gzip"):
        next(build_train_iterator(data, global_batch_size=2, num_batches=1))


def test_eval_iterator_skips_and_counts(tmp_path):
    manifest = _bad_text(tmp_path)
    data = TextDataParams(dataset_manifest=[manifest], seq_len=SEQ, max_bad_sample_fraction=0.5)
    ev = build_eval_iterator(data, [manifest], global_batch_size=4)
    batches = list(ev)
    assert _first_ids(batches) == [0, 1, 3, 3, 4, 6, 6, 7] and ev.bad_samples == 2
    assert all(set(b) == {"input_ids", "loss_mask", "valid"} for b in batches)
    with pytest.raises(DataError, match="max_bad_sample_fraction"):
        list(build_eval_iterator(data.replace(max_bad_sample_fraction=0.0), [manifest], global_batch_size=4))


# ---------------------------------------------------------------- text_untokenized: broken JSON


def test_broken_json_is_skipped_not_trained_on_as_text(tmp_path, caplog):
    texts = [b'{"text": "the red ball ."}', b'{"text": "the blue', b"the green box .", b'{"url": "x"}', b"a red box ."]
    samples = [{"__key__": f"k{i}", "json": t} for i, t in enumerate(texts)]
    manifest = write_shards(str(tmp_path / "u"), samples, samples_per_shard=5)
    data = TextUntokenizedDataParams(
        dataset_manifest=[manifest], tokenizer=TOKENIZER, seq_len=SEQ, shuffle=False, max_bad_sample_fraction=0.5
    )
    caplog.set_level(logging.WARNING)
    it = build_train_iterator(data, global_batch_size=4, num_batches=1)
    (batch,) = list(it)
    tok = load_tokenizer(TOKENIZER)
    expect = [tok(t)["input_ids"][: SEQ + 1] for t in ("the red ball .", "the green box .", "the green box .")]
    expect.append(tok("a red box .")["input_ids"][: SEQ + 1])
    for row, ids in zip(batch["input_ids"], expect, strict=True):
        assert row[: len(ids)].tolist() == ids
    assert it.bad_samples == 2
    skip = _skips(caplog, tmp_path)
    assert len(skip) == 1 and "'k1'" in skip[0] and "not valid JSON" in skip[0] and "shard-0000.tar" in skip[0]


# ---------------------------------------------------------------- image_caption: a zero-byte image


def _png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_zero_byte_image_is_skipped_and_counted(tmp_path, caplog):
    samples = [
        {"__key__": f"{i:04d}", "txt": b"a red ball .", "png": b"" if i == 1 else _png(10 * i)} for i in range(4)
    ]
    manifest = write_shards(str(tmp_path / "ic"), samples, samples_per_shard=4)
    data = ImageCaptionDataParams(
        dataset_manifest=[manifest],
        processor=PROCESSOR,
        img_num_tokens=4,
        image_size=32,
        seq_len=12,
        num_workers=0,
        shuffle=False,
        max_bad_sample_fraction=0.25,
    )
    caplog.set_level(logging.WARNING)
    it = build_train_iterator(data, global_batch_size=4, num_batches=1)
    (batch,) = list(it)
    values = batch["pixel_values"][:, 0, 0, 0, 0]
    np.testing.assert_allclose(values, np.array([0, 20, 20, 30]) / 255.0 * 2 - 1, atol=1e-6)
    assert it.bad_samples == 1
    (skip,) = _skips(caplog, tmp_path)
    assert "'0001'" in skip and os.path.join(str(tmp_path / "ic"), "shard-0000.tar") in skip and "decode" in skip
    with pytest.raises(DataError, match=r"image_caption\.max_bad_sample_fraction"):
        list(build_train_iterator(data.replace(max_bad_sample_fraction=0.0), global_batch_size=4, num_batches=1))


# ---------------------------------------------------------------- robotics: missing / corrupt lowdim.npz, bad image


@pytest.mark.skipif(not os.path.isdir(REACH), reason="tiny_data/reach not generated")
def test_robotics_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    source = ShardDataSource(os.path.join(REACH, "manifest.jsonl"))
    samples = []
    for i in range(8):
        raw = source[i]
        sample = {k: v for k, v in raw.items() if k != "__shard__"}
        if i == 1:
            del sample["lowdim.npz"]  # missing
        if i == 3:
            sample["lowdim.npz"] = raw["lowdim.npz"][: len(raw["lowdim.npz"]) // 2]  # truncated zip
        if i == 5:
            sample["scene_t0.png"] = b""  # zero-byte image
        samples.append(sample)
    root = tmp_path / "reach"
    manifest = write_shards(str(root), samples, samples_per_shard=8)
    for name in ("stats.json", "preprocessing_config.yaml"):
        shutil.copy(os.path.join(REACH, name), root / name)
    data = RoboticsDataParams(
        dataset_manifest=[manifest],
        dataset_statistics=[str(root / "stats.json")],
        processor=PROCESSOR,
        image_size=32,
        img_num_tokens=1,
        max_text_seq_len=12,
        action_fields=["action_xy"],
        proprioception_fields=["agent_xy"],
        normalization=NormalizationParams(method="min_max", centered_norm=True),
        num_workers=0,
        shuffle=False,
        max_bad_sample_fraction=0.5,
    )
    caplog.set_level(logging.WARNING)
    it = build_train_iterator(data, global_batch_size=4, num_batches=2)
    batches = list(it)
    assert it.bad_samples == 3 and all(b["actions"].shape[0] == 4 for b in batches)
    good = build_eval_iterator(data, [os.path.join(REACH, "manifest.jsonl")], global_batch_size=8)
    reference = next(iter(good))["actions"]  # the same 8 samples, unbroken, in order
    got = np.concatenate([b["actions"] for b in batches])
    for row, src in enumerate([0, 2, 2, 4, 4, 6, 6, 7]):
        np.testing.assert_allclose(got[row], reference[src], rtol=1e-6)
    (skip,) = _skips(caplog, tmp_path)  # one shard: one line
    assert repr(samples[1]["__key__"]) in skip and str(root / "shard-0000.tar") in skip and "lacks lowdim.npz" in skip
    assert it.bad_sample_stats["bad_samples_by_shard"] == {str(root / "shard-0000.tar"): 3}
    with pytest.raises(DataError, match=r"3 bad samples.*robotics\.max_bad_sample_fraction"):
        list(build_train_iterator(data.replace(max_bad_sample_fraction=0.25), global_batch_size=4, num_batches=2))


# ---------------------------------------------------------------- manifests that disagree with their shards


def test_manifest_count_mismatch_warns_and_empty_shard_errors(tmp_path, caplog):
    manifest = write_shards(str(tmp_path / "m"), _text_samples(10, {}), samples_per_shard=5)
    lines = [json.loads(line) for line in open(manifest)]
    lines[1]["num_sequences"] = 128
    with open(manifest, "w") as f:
        f.write("\n".join(json.dumps(line) for line in lines) + "\n")
    caplog.set_level(logging.WARNING)
    assert len(ShardDataSource(manifest)) == 10  # what is in the tars
    (warning,) = _warnings(caplog)
    assert "shard-0001.tar (manifest 128, found 5)" in warning and manifest in warning
    open(tmp_path / "m" / "shard-0001.tar", "wb").close()  # a zero-byte shard the manifest says holds 128
    with pytest.raises(DataError, match=r"shard-0001\.tar' holds no samples but manifest .* num_sequences = 128"):
        ShardDataSource(manifest)
    with open(tmp_path / "m" / "shard-0001.tar", "wb") as f:  # an empty (but valid) tar
        f.write(b"\0" * 1024)
    with pytest.raises(DataError, match=r"shard-0001\.tar' holds no samples"):
        ShardDataSource(manifest)


def test_a_cut_tar_keeps_its_complete_samples_and_skips_the_cut_one(tmp_path, caplog):
    manifest = write_shards(str(tmp_path / "c"), _text_samples(8, {}), samples_per_shard=4)
    path = tmp_path / "c" / "shard-0001.tar"
    source = ShardDataSource(manifest)
    cut = int(source._shards[1].offsets[2]) + 10  # in the middle of the third sample's data
    path.write_bytes(path.read_bytes()[:cut])
    caplog.set_level(logging.WARNING)
    source = ShardDataSource(manifest)
    assert source.samples_per_shard == [4, 3]
    assert any(str(path) in m and "cut short" in m for m in _warnings(caplog))
    with pytest.raises(BadSampleError, match=r"'000006'.*cut short"):
        source[6]
    data = TextDataParams(dataset_manifest=[manifest], seq_len=SEQ, shuffle=False, max_bad_sample_fraction=0.5)
    it = build_train_iterator(data, global_batch_size=7, num_batches=1)
    assert _first_ids(it) == [0, 1, 2, 3, 4, 5, 0] and it.bad_samples == 1  # 6 is cut: replaced by the next (0)


# ---------------------------------------------------------------- params: nonsensical or ignored values fail


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lr", -1e-3, r"hparams\.lr = -0\.001 must be >= 0"),
        ("lr", float("nan"), r"hparams\.lr = nan"),
        ("wd", -0.1, r"hparams\.wd"),
        ("grad_clip_norm", -1.0, r"hparams\.grad_clip_norm"),
        ("eps", 0.0, r"hparams\.eps"),
        ("beta2", 1.0, r"hparams\.beta2"),
        ("warmup", "-5", r"hparams\.warmup"),
        ("decay", "-0.5", r"hparams\.decay"),
    ],
)
def test_nonsensical_hparams_name_the_field(field, value, match):
    with pytest.raises(ParamsError, match=match):
        HyperParams(**{field: value})


def test_accepted_and_ignored_fields_now_fail():
    with pytest.raises(ParamsError, match=r"experiment\.num_epochs = 3 .*total_train_samples"):
        TrainExperimentParams(num_epochs=3)
    for field, value in (
        ("pose_groups", [{"name": "left", "fields": ["x"]}]),
        ("intrinsics_fields", ["intrinsics.scene_right_0"]),
        ("extrinsics_fields", ["extrinsics.scene_right_0"]),
        ("val_dataset_statistics", ["val/stats.json"]),
    ):
        with pytest.raises(ParamsError, match=rf"robotics\.{field} = .* would be ignored"):
            RoboticsDataParams(**{field: value})
    with pytest.raises(ParamsError, match=r"text\.val_dataset_weighting = \[1\.0\] would be ignored"):
        TextDataParams(val_dataset_manifest=["v"], val_dataset_weighting=[1.0])
    with pytest.raises(ParamsError, match=r"robotics\.point_cloud_num_points"):
        RoboticsDataParams(point_cloud_num_points=1024)
    for bad in (-0.1, 1.5):
        with pytest.raises(ParamsError, match=r"text\.max_bad_sample_fraction.*data\.max_bad_sample_fraction"):
            TextDataParams(max_bad_sample_fraction=bad)
    with pytest.raises(ParamsError, match=r"experiment\.log_every_n_steps"):
        TrainExperimentParams(log_every_n_steps=0)


def test_warmup_longer_than_the_run_warns(caplog):
    from vla_foundry_jax.params import train_params

    train_params._warn_once.cache_clear()  # warned once per message and process
    caplog.set_level(logging.WARNING)
    check_warmup(TrainExperimentParams(total_train_samples=64, hparams=HyperParams(global_batch_size=8, warmup="1000")))
    assert any("hparams.warmup = '1000' steps is longer than the run's 8 steps" in m for m in _warnings(caplog))
    caplog.clear()
    check_warmup(TrainExperimentParams(total_train_samples=64, hparams=HyperParams(global_batch_size=8, warmup="0.5")))
    assert not _warnings(caplog)


def test_max_seq_len_shorter_than_the_data_fails_before_training():
    lm = TransformerParams(hidden_dim=32, n_layers=1, n_heads=2, max_seq_len=32)
    data = TextUntokenizedDataParams(dataset_manifest=["m"], seq_len=64)
    with pytest.raises(ParamsError, match=r"transformer\.max_seq_len = 32 .* text_untokenized\.seq_len = 64"):
        check_sequence_fits(lm, data)
    check_sequence_fits(lm.replace(max_seq_len=64), data)
    vlm = VLMParams(transformer=lm, image_token_id=7)
    with pytest.raises(ParamsError, match=r"max_seq_len = 32 .* image_caption\.seq_len = 48"):
        check_sequence_fits(vlm, ImageCaptionDataParams(seq_len=48))


def test_resolve_checks_max_seq_len(tmp_path):
    from vla_foundry_jax.training.resolve import resolve_experiment

    manifest = write_shards(str(tmp_path / "t"), _text_samples(4, {}), samples_per_shard=4)
    exp = TrainExperimentParams(
        total_train_samples=8,
        model=TransformerParams(hidden_dim=32, n_layers=1, n_heads=2, max_seq_len=16, vocab_size=64),
        data=TextDataParams(dataset_manifest=[manifest], seq_len=32),
        hparams=HyperParams(global_batch_size=4, per_gpu_batch_size=4, warmup="0"),
    )
    with pytest.raises(ParamsError, match=r"transformer\.max_seq_len = 16"):
        resolve_experiment(exp)


# ---------------------------------------------------------------- gin includes print no error lines


def test_gin_include_prints_no_error_line(caplog, capfd):
    from vla_foundry_jax import gin_utils

    caplog.set_level(logging.DEBUG)
    gin_utils.parse_gin(["gin_configs/quickstart.gin"], [])  # includes transformer_tiny.gin
    import gin

    assert gin.query_parameter("transformer.max_seq_len") == 128  # the include was read
    gin.clear_config()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if "Path not found" in r.getMessage()]
    assert "Path not found" not in capfd.readouterr().err


# ---------------------------------------------------------------- requirements


IMPORT_TO_REQUIREMENT = {
    "PIL": "pillow",
    "absl": "absl-py",
    "gin": "gin-config",
    "yaml": "pyyaml",
    "orbax": "orbax-checkpoint",
    "tensorboardX": "tensorboardx",
    "huggingface_hub": "huggingface_hub",
}
TEST_ONLY_IMPORTS = {"torch"}  # only to rebuild the bundled tiny CLIP (requirements-test.txt)
OPTIONAL_IMPORTS = {"wandb"}  # extras of setup.py (pip install .[wandb]), imported only when asked for


def setup_extras() -> dict[str, list[str]]:
    """``extras_require`` of setup.py, read from its syntax tree."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    return {}


def test_requirements_hold_every_runtime_import():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        names = {re.split(r"[<>=\[ ;]", line.strip())[0].lower() for line in f if line.strip()[:1].isalpha()}
    imported = set()
    for top in ("vla_foundry_jax", "launch"):
        for root, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                with open(os.path.join(root, name)) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        imported |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        imported.add(node.module.split(".")[0])
    first_party = {"vla_foundry_jax", "launch", "vla_foundry_jax_client"}  # the client: its own package here
    third_party = imported - set(sys.stdlib_module_names) - first_party - TEST_ONLY_IMPORTS
    missing = {m for m in third_party - OPTIONAL_IMPORTS if IMPORT_TO_REQUIREMENT.get(m, m).lower() not in names}
    assert not missing, f"imported but not in requirements.txt: {sorted(missing)}"
    extras = setup_extras()
    for m in OPTIONAL_IMPORTS & third_party:
        assert any(r.startswith(m) for r in extras.get(m, [])), f"{m} is imported but not the setup.py extra [{m}]"
    with open(os.path.join(ROOT, "requirements-test.txt")) as f:
        assert all(m in f.read() for m in OPTIONAL_IMPORTS)  # CI installs the extras to test them
    assert "matplotlib" in names  # the run pictures
    assert "jinja2" in names  # transformers renders chat templates (robotics prompts) with it


def test_training_logs_the_skipped_samples(tmp_path):
    """The loop writes the pipeline's running count of skipped samples to metrics.jsonl."""
    from tests.fixtures.runs import tiny_experiment
    from vla_foundry_jax.training.loop import train

    manifest = _bad_text(tmp_path)
    exp = tiny_experiment(str(tmp_path / "run"), steps=2, batch=4, seq_len=SEQ)
    data = TextDataParams(dataset_manifest=[manifest], seq_len=SEQ, shuffle=False, max_bad_sample_fraction=0.5)
    train(exp.replace(data=data))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["bad_samples"] for r in rows] == [1.0, 2.0]  # samples 2 and 5 of 8, one per batch of 4
