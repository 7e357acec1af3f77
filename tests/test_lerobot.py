"""LeRobot datasets in: tiny v2.1 / v3.0 datasets written here (parquet + mp4), converted, checked, trained on."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from vla_foundry_jax.apps.lerobot_convert import COMPLETE_FILE, ConvertOptions, convert_lerobot
from vla_foundry_jax.data.lerobot import LeRobotDataset, LeRobotError, resolve_lerobot_source
from vla_foundry_jax.data.normalization import PERCENTILES, merge_stats
from vla_foundry_jax.data.shards import DataError, ShardDataSource
from vla_foundry_jax.data.stats import (
    QuantileSketch,
    accumulate_shards,
    compute_stats,
    merge_dataset_stats,
)
from vla_foundry_jax.testbeds.tiny_lerobot import CAMERAS, write_tiny_lerobot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAST, FUTURE = 1, 3


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """``{version: (root, truth)}`` for both layouts (4 episodes of 9-12 frames, 2 cameras 32x32, 10 fps)."""
    out = {}
    for version in ("v2.1", "v3.0"):
        root = str(tmp_path_factory.mktemp(f"lerobot_{version}"))
        out[version] = (root, write_tiny_lerobot(root, version=version, seed=0))
    return out


def _options(source: str, output_dir: str, **kw) -> ConvertOptions:
    base = dict(
        past_lowdim_steps=PAST, future_lowdim_steps=FUTURE, image_indices=(-1, 0), val_fraction=0.25,
        samples_per_shard=16, progress=False,
    )  # fmt: skip
    return ConvertOptions(source=source, output_dir=output_dir, **{**base, **kw})


@pytest.fixture(scope="module")
def converted(datasets, tmp_path_factory):
    """``{version: (output_dir, result)}``: each layout converted with the defaults of ``_options``."""
    out = {}
    for version, (root, _) in datasets.items():
        dst = str(tmp_path_factory.mktemp(f"converted_{version}"))
        out[version] = (dst, convert_lerobot(_options(root, dst)))
    return out


def _video_frames(path: str) -> list[np.ndarray]:
    import av

    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _samples(output_dir: str) -> list[dict]:
    out = []
    for split in ("train", "val"):
        manifest = os.path.join(output_dir, split, "manifest.jsonl")
        if os.path.isfile(manifest):
            src = ShardDataSource(manifest)
            out += [dict(src[i], __split__=split) for i in range(len(src))]
    return out


def _npz(raw: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(raw)) as z:
        return {k: z[k] for k in z.files}


def _jpeg(raw: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(np.int64)


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("version", ["v2.0", "v2.1", "v3.0"])
def test_reader_reads_both_layouts(datasets, version, tmp_path):
    if version == "v2.0":  # v2.1's layout (v2.1 only changed the stats files)
        root = str(tmp_path / "v20")
        truth = write_tiny_lerobot(root, version=version, num_episodes=2)
    else:
        root, truth = datasets[version]
    ds = LeRobotDataset(root)
    assert ds.version == version and ds.fps == 10.0 and ds.cameras == list(CAMERAS)
    assert ds.lowdim_fields == ["observation.state", "action"]
    assert sorted(ds.episodes) == sorted(truth)
    for e, t in truth.items():
        assert ds.episodes[e].length == len(t["action"]) and ds.episodes[e].tasks == (t["task"],)
        raw = ds.read_episode(e, ["action", "observation.state"])
        np.testing.assert_array_equal(raw["action"], t["action"])
        np.testing.assert_array_equal(raw["observation.state"], t["state"])
        np.testing.assert_array_equal(raw["frame_index"], np.arange(len(t["action"])))
        for cam in CAMERAS:
            frames = np.stack(ds.decode_video(e, cam, raw["timestamp"])).astype(np.int64)
            err = np.abs(frames - t["frames"][cam]).mean(axis=(1, 2, 3))
            assert err.max() < 4.0, err  # H.264 yuv420p of smooth images
            shifted = np.abs(frames[1:] - t["frames"][cam][:-1]).mean(axis=(1, 2, 3))
            assert (err[1:] < shifted).all()  # the right frame, not a neighbour (v3.0: episodes share an mp4)


# ---------------------------------------------------------------- conversion round trip


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_conversion_round_trip(datasets, converted, version):
    root, truth = datasets[version]
    out, result = converted[version]
    assert os.path.isfile(os.path.join(out, COMPLETE_FILE)) and result["shards_reused"] == 0
    splits = {
        s: json.load(open(os.path.join(out, s, "processing_metadata.json")))["episodes"] for s in ("train", "val")
    }
    assert sorted(splits["train"] + splits["val"]) == sorted(truth) and len(splits["val"]) == 1
    samples = _samples(out)
    assert len(samples) == sum(len(t["action"]) for t in truth.values())  # every frame anchors (padding <= 1 / 7)
    video = {}
    for s in samples:
        meta = json.loads(s["metadata.json"])
        e, t = meta["episode_index"], meta["anchor_timestep"]
        assert e in splits[s["__split__"]] and meta["anchor_relative_idx"] == PAST
        gt = truth[e]
        L = len(gt["action"])
        rows = np.clip(np.arange(t - PAST, t + FUTURE + 1), 0, L - 1)
        low = _npz(s["lowdim.npz"])
        np.testing.assert_array_equal(low["action"], gt["action"][rows])  # low-dim arrays exactly
        np.testing.assert_array_equal(low["observation.state"], gt["state"][rows])
        assert low["action"].dtype == np.float32
        inside = (np.arange(t - PAST, t + FUTURE + 1) >= 0) & (np.arange(t - PAST, t + FUTURE + 1) < L)
        np.testing.assert_array_equal(low["past_mask"], inside & (np.arange(PAST + 1 + FUTURE) < PAST))
        np.testing.assert_array_equal(low["future_mask"], inside & (np.arange(PAST + 1 + FUTURE) >= PAST))
        assert json.loads(s["language_instructions.json"]) == {"original": [gt["task"]]}
        ds = LeRobotDataset(root)
        for i in (-1, 0):
            r = int(np.clip(t + i, 0, L - 1))
            for cam in CAMERAS:
                img = _jpeg(s[f"{cam}_t{i}.jpg"])
                rel, start = ds.episodes[e].videos[cam]
                if rel not in video:
                    video[rel] = _video_frames(os.path.join(root, rel))
                first = round(start * 10)
                decoded = video[rel][first + r].astype(np.int64)
                assert np.abs(img - decoded).mean() < 3.0 and np.abs(img - decoded).max() < 48  # JPEG q95, 4:2:0
                assert np.abs(img - gt["frames"][cam][r]).mean() < 5.0  # codec + JPEG
    cfg = __import__("yaml").safe_load(open(os.path.join(out, "train", "preprocessing_config.yaml")))
    assert cfg["camera_names"] == list(CAMERAS) and cfg["image_indices"] == [-1, 0]
    assert (cfg["past_lowdim_steps"], cfg["future_lowdim_steps"]) == (PAST, FUTURE)


def test_image_features_stored_in_parquet_round_trip_exactly(tmp_path):
    root = str(tmp_path / "img")
    truth = write_tiny_lerobot(root, version="v2.1", num_episodes=2, image_storage="image")
    assert LeRobotDataset(root).cameras == list(CAMERAS) and not LeRobotDataset(root).video_cameras
    out = str(tmp_path / "o")
    convert_lerobot(_options(root, out, image_format="png", val_fraction=0.0))
    from PIL import Image

    for s in _samples(out):
        meta = json.loads(s["metadata.json"])
        frame = truth[meta["episode_index"]]["frames"][CAMERAS[1]][meta["anchor_timestep"]]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s[f"{CAMERAS[1]}_t0.png"]))), frame)


# ---------------------------------------------------------------- statistics


def _windows(output_dir: str, split: str = "train") -> tuple[dict[str, np.ndarray], np.ndarray]:
    src = ShardDataSource(os.path.join(output_dir, split, "manifest.jsonl"))
    lows = [_npz(src[i]["lowdim.npz"]) for i in range(len(src))]
    fields = {k: np.stack([w[k] for w in lows]).astype(np.float64) for k in lows[0] if not k.endswith("_mask")}
    mask = np.stack([w["past_mask"] | w["future_mask"] for w in lows])
    return fields, mask


def _check_percentile(est: np.ndarray, values: np.ndarray, p: float, a: float, z: float) -> None:
    """``est [d]`` vs NumPy's linear percentile of ``values [n, d]`` within the stated bound."""
    x = np.sort(values, axis=0)
    n = x.shape[0]
    k = int(np.floor((n - 1) * p / 100))
    bound = a * np.maximum(np.abs(x[k]), np.abs(x[min(k + 1, n - 1)])) + z
    err = np.abs(est - np.percentile(values, p, axis=0))
    assert (err <= bound * (1 + 1e-9) + 1e-15).all(), (p, err, bound)


def test_stats_match_numpy_on_the_full_data(converted, tmp_path):
    out, _ = converted["v2.1"]
    stats = json.load(open(os.path.join(out, "train", "stats.json")))
    again = compute_stats(os.path.join(out, "train", "manifest.jsonl"), output=str(tmp_path / "s.json"), num_workers=2)
    assert again == stats  # parallel over shards, merged: the same numbers as the conversion's
    fields, mask = _windows(out)
    assert sorted(stats) == sorted(fields)
    for name, x in fields.items():
        s = {k: np.asarray(v, np.float64) for k, v in stats[name].items() if k != "percentile_error" and v is not None}
        a, z = stats[name]["percentile_error"]["relative_error"], stats[name]["percentile_error"]["zero_threshold"]
        T = x.shape[1]
        count = mask.sum(0)
        np.testing.assert_array_equal(s["count"], count)
        for t in range(T):
            v = x[mask[:, t], t]
            np.testing.assert_allclose(s["mean_per_timestep"][t], v.mean(0), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(s["std_per_timestep"][t], v.std(0, ddof=1), rtol=1e-10, atol=1e-12)
            np.testing.assert_array_equal(s["min_per_timestep"][t], v.min(0))
            np.testing.assert_array_equal(s["max_per_timestep"][t], v.max(0))
            for p in PERCENTILES:
                _check_percentile(s[f"percentile_{p}_per_timestep"][t], v, p, a, z)
        valid = x[mask]
        np.testing.assert_allclose(s["mean"], valid.mean(0), rtol=1e-12, atol=1e-12)
        w = count / count.sum()
        mt = np.stack([x[mask[:, t], t].mean(0) for t in range(T)])
        vt = np.stack([x[mask[:, t], t].var(0, ddof=1) for t in range(T)])
        std = np.sqrt((w[:, None] * vt).sum(0) + (w[:, None] * (mt - valid.mean(0)) ** 2).sum(0))
        np.testing.assert_allclose(s["std"], std, rtol=1e-10)  # the original's law-of-total-variance formula
        np.testing.assert_array_equal(s["min"], valid.min(0))
        np.testing.assert_array_equal(s["max"], valid.max(0))
        for p in PERCENTILES:
            _check_percentile(s[f"percentile_{p}"], valid, p, a, z)


def test_quantile_sketch_bound_and_order_free_merges():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_cauchy(30000), rng.normal(0, 1e-6, 3000), np.zeros(50), rng.exponential(5, 3000)])
    a, z = 1e-3, 1e-9
    whole = QuantileSketch(1, a, z)
    whole.add(np.zeros(len(x), np.int64), x)
    parts = []
    for chunk in np.array_split(rng.permutation(x), 7):
        s = QuantileSketch(1, a, z)
        s.add(np.zeros(len(chunk), np.int64), chunk)
        parts.append(s)
    merged = QuantileSketch(1, a, z)
    for s in reversed(parts):
        merged.merge(s)
    np.testing.assert_array_equal(merged.codes, whole.codes)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    ps = [0.1, *PERCENTILES, 50, 99.9]
    est = whole.quantiles(ps)[0]
    for p, e in zip(ps, est, strict=True):
        _check_percentile(np.array([e]), x[:, None], p, a, z)


def test_merge_dataset_stats_with_weights(converted, tmp_path):
    a_dir, b_dir = converted["v2.1"][0], converted["v3.0"][0]
    a, b = os.path.join(a_dir, "train", "stats.json"), os.path.join(b_dir, "train", "stats.json")
    shards = {d: sorted(glob.glob(os.path.join(d, "train", "shard-*.tar"))) for d in (a_dir, b_dir)}
    merged = merge_dataset_stats([a, b], output=str(tmp_path / "m" / "stats.json"))
    together, _ = accumulate_shards(shards[a_dir] + shards[b_dir])
    reference = merge_stats([json.load(open(a)), json.load(open(b))])  # normalization's count-weighted merge
    twice_a, _ = accumulate_shards(shards[a_dir] * 2 + shards[b_dir])
    weighted = merge_dataset_stats([a, b], [2.0, 1.0])
    for field in ("action", "observation.state"):
        exact = together[field].to_stats()
        for key in ("mean", "std", "min", "max", "count", "mean_per_timestep", "std_per_timestep", "max_per_timestep"):
            np.testing.assert_allclose(merged[field][key], exact[key], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(merged[field][key], reference[field][key], rtol=1e-10, atol=1e-12)
        for p in PERCENTILES:  # sketches merge exactly: the same percentiles as one pass over both datasets
            np.testing.assert_array_equal(merged[field][f"percentile_{p}"], exact[f"percentile_{p}"])
        dup = twice_a[field].to_stats()
        for key in ("mean", "std", "count", "std_per_timestep", f"percentile_{PERCENTILES[0]}", "percentile_99"):
            np.testing.assert_allclose(weighted[field][key], dup[key], rtol=1e-10, atol=1e-12)
    assert os.path.isfile(tmp_path / "m" / "stats_sketch.npz")
    assert os.path.isfile(tmp_path / "m" / "preprocessing_config.yaml")  # same windows: usable as robotics stats


# ---------------------------------------------------------------- options


def test_relative_actions_fps_stride_still_filter_and_zero_padding(datasets, tmp_path):
    root, truth = datasets["v2.1"]
    opts = _options(
        root, str(tmp_path / "o"), fps=5.0, relative_actions=("action:observation.state:0-1",), stride=1,
        padding_strategy="zero", filter_still_samples=True, still_threshold=0.05, image_format="png",
        resize_images_size=(16, 24), val_fraction=0.0,
    )  # fmt: skip
    result = convert_lerobot(opts)
    assert set(result["splits"]) == {"train"}
    kept, expected = set(), set()
    for e, gt in truth.items():
        rows = np.arange(0, len(gt["action"]), 2)  # 10 fps -> 5 fps: every other frame
        act, st = gt["action"][rows], gt["state"][rows]
        L = len(rows)
        for t in range(L):
            lo, hi = max(0, t - PAST), min(L - 1, t + FUTURE)
            if t + FUTURE - (L - 1) > 7:
                continue
            moving = any(np.std(f[lo : hi + 1], axis=0).max() > 0.05 for f in (act, st) if hi > lo)
            if moving:
                expected.add((e, t))
    for s in _samples(opts.output_dir):
        meta = json.loads(s["metadata.json"])
        e, t = meta["episode_index"], meta["anchor_timestep"]
        kept.add((e, t))
        rows = np.arange(0, len(truth[e]["action"]), 2)
        act, st = truth[e]["action"][rows], truth[e]["state"][rows]
        idx = np.arange(t - PAST, t + FUTURE + 1)
        inside = (idx >= 0) & (idx < len(rows))
        low = _npz(s["lowdim.npz"])
        want = np.where(inside[:, None], act[np.clip(idx, 0, len(rows) - 1)], 0)
        np.testing.assert_array_equal(low["action"], want)
        rel = want.copy()
        rel[:, :2] -= st[t, :2]
        np.testing.assert_allclose(low["action_relative"], np.where(inside[:, None], rel, 0), rtol=0, atol=1e-6)
        assert meta["timestamp"] == pytest.approx(float(truth[e]["timestamp"][rows[t]]))
        from PIL import Image

        assert Image.open(io.BytesIO(s[f"{CAMERAS[0]}_t0.png"])).size == (24, 16)
    assert kept == expected and 0 < len(kept) < sum(len(np.arange(0, len(t["action"]), 2)) for t in truth.values())
    total = sum(len(np.arange(0, len(t["action"]), 2)) for t in truth.values())
    assert result["splits"]["train"]["filtered_still"] == total - len(expected)


# ---------------------------------------------------------------- resuming, sources


def test_resume_converts_only_unfinished_shards(datasets, converted, tmp_path):
    root, _ = datasets["v3.0"]
    done, first = converted["v3.0"]
    out = str(tmp_path / "resume")
    shutil.copytree(done, out)
    # the state of a killed run: no completion marker, no manifests / stats yet, one shard lost mid-write
    for f in [COMPLETE_FILE, *glob.glob("*/manifest.jsonl", root_dir=out), *glob.glob("*/stats.json", root_dir=out)]:
        os.remove(os.path.join(out, f))
    os.rename(os.path.join(out, "train", "shard-000001.tar"), os.path.join(out, "train", "shard-000001.tar.tmp-123"))
    os.remove(os.path.join(out, "train", "shard-000001.json"))
    with pytest.raises(DataError, match="manifest not found"):  # a partial output is not a dataset
        ShardDataSource(os.path.join(out, "train", "manifest.jsonl"))
    with pytest.raises(LeRobotError, match="other options"):
        convert_lerobot(_options(root, out, future_lowdim_steps=FUTURE + 1))
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "*", "shard-*.tar"))}
    result = convert_lerobot(_options(root, out))
    assert result["shards_converted"] == 1 and result["shards_reused"] == first["shards_converted"] - 1
    for p, mtime in before.items():
        assert os.stat(p).st_mtime_ns == mtime  # finished shards not redone
    assert not glob.glob(os.path.join(out, "*", "*.tmp-*"))
    for split in ("train", "val"):
        for name in os.listdir(os.path.join(done, split)):
            if name.endswith((".tar", ".jsonl", "stats.json")):
                with (
                    open(os.path.join(done, split, name), "rb") as f1,
                    open(os.path.join(out, split, name), "rb") as f2,
                ):
                    assert f1.read() == f2.read(), name
    assert convert_lerobot(_options(root, out))["already_complete"]
    again = convert_lerobot(_options(root, out, future_lowdim_steps=FUTURE + 1, overwrite=True))
    assert again["shards_reused"] == 0 and again["splits"]["train"]["num_samples"] > 0


def test_parallel_conversion_and_s3_source(datasets, converted, tmp_path, s3):
    from vla_foundry_jax import paths

    root, _ = datasets["v3.0"]
    source = f"{s3.bucket()}/tiny_lerobot_v3"
    paths.upload_tree(root, source)
    opts = _options(source, str(tmp_path / "p"), num_workers=2, cache_dir=str(tmp_path / "c"))
    result = convert_lerobot(opts)
    ref_dir, _ = converted["v3.0"]
    for split in ("train", "val"):
        for name in sorted(os.listdir(os.path.join(ref_dir, split))):
            if name.endswith(".tar"):
                with open(os.path.join(ref_dir, split, name), "rb") as f1:
                    with open(os.path.join(opts.output_dir, split, name), "rb") as f2:
                        assert f1.read() == f2.read(), name
    assert result["num_workers"] == 2 and result["frames_per_second"] > 0


def test_hub_id_offline_error_says_how_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LeRobotError) as e:
        resolve_lerobot_source("nobody-here/no-such-dataset", cache_dir=str(tmp_path / "hf"))
    msg = str(e.value)
    assert "huggingface-cli download nobody-here/no-such-dataset --repo-type dataset" in msg and "--source" in msg


# ---------------------------------------------------------------- bad input


def _expect(opts: ConvertOptions, *words: str) -> str:
    with pytest.raises(LeRobotError) as e:
        convert_lerobot(opts)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def test_bad_inputs_name_the_episode_field_and_fix(datasets, tmp_path):
    root, _ = datasets["v2.1"]
    out = str(tmp_path / "o")
    _expect(_options(root, out, cameras=("observation.images.side",)), "'observation.images.side'", "--cameras")
    _expect(_options(root, out, action_fields=("actions",)), "'actions'", "--action_fields", "observation.state")
    bad = str(tmp_path / "nan")
    write_tiny_lerobot(bad, version="v2.1", nan_action=(2, 4))
    _expect(_options(bad, out), "episode 2", "'action'", "NaN at frame 4", "--skip_episodes=2")
    assert convert_lerobot(_options(bad, str(tmp_path / "skip"), skip_episodes=(2,)))["num_frames"] > 0
    short = str(tmp_path / "short")
    write_tiny_lerobot(short, version="v2.1", short_video=(1, CAMERAS[1], 6))
    _expect(_options(short, str(tmp_path / "o2")), "episode 1", CAMERAS[1], "shorter", "0.5000 s")
    zero = str(tmp_path / "zero")
    write_tiny_lerobot(zero, version="v2.1")
    lines = open(os.path.join(zero, "meta", "episodes.jsonl")).read().splitlines()
    row = json.loads(lines[3])
    row["length"] = 0
    lines[3] = json.dumps(row)
    open(os.path.join(zero, "meta", "episodes.jsonl"), "w").write("\n".join(lines) + "\n")
    _expect(_options(zero, str(tmp_path / "o3")), "episode 3", "zero length", "--skip_episodes=3")
    old = str(tmp_path / "old")
    shutil.copytree(root, old)
    info = json.load(open(os.path.join(old, "meta", "info.json")))
    info["codebase_version"] = "v1.6"
    json.dump(info, open(os.path.join(old, "meta", "info.json"), "w"))
    _expect(_options(old, str(tmp_path / "o4")), "unknown LeRobot version", "'v1.6'", "v2.1", "v3.0")
    assert not os.path.exists(os.path.join(tmp_path / "o4", COMPLETE_FILE))


# ---------------------------------------------------------------- the commands end to end


def test_cli_convert_stats_train(datasets, tmp_path):
    """convert (CLI) -> compute_stats (CLI) -> train a diffusion_policy for 2 steps through launch.train -> offline
    action error on val/; a bad camera on the command line prints one ``error:`` line and exits 2. (The independent
    commands run side by side to keep the module fast.)"""
    root, _ = datasets["v3.0"]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    out = str(tmp_path / "data")
    convert = [sys.executable, "-m", "launch.convert_lerobot", f"--source={root}", f"--output_dir={out}"]
    convert += [f"--past_lowdim_steps={PAST}", f"--future_lowdim_steps={FUTURE}", "--val_fraction=0.25"]

    def start(cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    bad = start([*convert[:-3], f"--output_dir={tmp_path / 'bad'}", "--cameras=observation.images.side"])
    done = subprocess.run([*convert, "--progress=false"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    manifest = summary["splits"]["train"]["manifest"]
    stats_cli = str(tmp_path / "stats_cli" / "stats.json")
    stats = start([sys.executable, "-m", "launch.compute_stats", f"--manifest={manifest}", f"--output={stats_cli}"])
    run = str(tmp_path / "run")
    gin = tmp_path / "lerobot.gin"
    gin.write_text(
        "include 'gin_configs/vla_quickstart.gin'\n"
        "vit_backbone.n_layers = 1\ntransformer.n_layers = 1\ntransformer.max_seq_len = 96\n"
        f"robotics.dataset_manifest = ['{manifest}']\n"
        f"robotics.val_dataset_manifest = ['{summary['splits']['val']['manifest']}']\n"
        f"robotics.dataset_statistics = ['{os.path.join(out, 'train', 'stats.json')}']\n"
        "robotics.action_fields = ['action']\nrobotics.proprioception_fields = ['observation.state']\n"
        f"experiment.output_dir = '{run}'\nexperiment.total_train_samples = 16\nexperiment.num_checkpoints = 1\n"
        "experiment.log_every_n_steps = 1\nhparams.global_batch_size = 8\nhparams.per_gpu_batch_size = 8\n"
    )
    train = start([sys.executable, "-m", "launch.train", f"--gin_file={gin}"])
    _, err = bad.communicate()
    lines = err.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: camera 'observation.images.side'")
    _, err = stats.communicate()
    assert stats.returncode == 0, err[-2000:]
    assert open(stats_cli).read() == open(os.path.join(out, "train", "stats.json")).read()
    _, err = train.communicate()
    assert train.returncode == 0, err[-3000:]
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
    from vla_foundry_jax.apps.policy_offline_eval import offline_action_error

    ev = offline_action_error(run, batch_size=8, num_inference_steps=2)  # the run's val/ split
    assert ev["num_samples"] == summary["splits"]["val"]["num_samples"] and np.isfinite(ev["val_action_error"])
    assert len(ev["val_action_mae"]) == 3 and ev["used_ema"]
