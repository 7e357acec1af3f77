"""robotics data: params resolution, the original's LBM layout, windows, normalisation, the tiny reach task, resume."""

from __future__ import annotations

import copy
import io
import json
import os

import gin
import numpy as np
import pytest
import yaml

from tests.fixtures.paths import PROCESSOR, REACH
from tests.fixtures.robotics import reach_data
from vla_foundry_jax.data import DataError, ShardDataSource, build_eval_iterator, build_train_iterator, write_shards
from vla_foundry_jax.data.normalization import Normalizer, merge_stats
from vla_foundry_jax.data.processor import VLMProcessor, load_processor
from vla_foundry_jax.data.robotics import (
    crop_window,
    image_key,
    resolve_robotics_data,
    robotics_text,
    robotics_transform,
    select_instruction,
)
from vla_foundry_jax.params import (
    DataAugmentationParams,
    DiffusionPolicyParams,
    HyperParams,
    TrainExperimentParams,
    TransformerParams,
)
from vla_foundry_jax.params.base import ParamsError, params_from_dict
from vla_foundry_jax.params.data_params import (
    ColorJitterParams,
    CropParams,
    FieldNormalizationParams,
    ImageAugmentationParams,
    NormalizationParams,
    RoboticsDataParams,
)
from vla_foundry_jax.testbeds.tiny_robotics import (
    ACTION_FIELD,
    MAX_STEP,
    PROPRIO_FIELD,
    SUCCESS_RADIUS,
    ReachEnv,
    compute_stats,
    expert_action,
    make_tiny_robotics_datasets,
    npz_bytes,
    render,
    write_reach_split,
)
from vla_foundry_jax.training.resolve import resolve_experiment

IMAGE_ID, PAD_ID = 142, 0

# ---------------------------------------------------------------- a hand-written dataset in the original's LBM layout

CAMS = ("scene_right_0", "wrist_left_plus")
PROP = "robot__actual__poses__left::panda__xyz"
ACT = "robot__desired__poses__left::panda__xyz"
GRIP = "robot__desired__grippers__left::panda_hand"
T_WIN = 6  # past 1 + current + future 4, current step at row 1
INSTR = {"original": ["the red ball"], "randomized": ["a blue box", "the green kite"]}


def lowdim_values(s: int) -> dict[str, np.ndarray]:
    t, d = np.arange(T_WIN, dtype=np.float64)[:, None], np.arange(3, dtype=np.float64)[None]
    return {PROP: 100 * s + 10 * t + d, ACT: 100 * s + 10 * t + d + 5, GRIP: 0.5 * s + t + np.zeros((1, 1))}


def image_value(name: str) -> int:
    """Grey level of image ``name`` (distinct per camera and time index)."""
    return {"scene_right_0_t-1": 20, "wrist_left_plus_t-1": 70, "scene_right_0_t0": 120, "wrist_left_plus_t0": 170}[
        name
    ]


def _jpg(value: int, size: int = 16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def lbm_sample(s: int, *, drop: tuple[str, ...] = (), drop_field: str | None = None) -> dict[str, bytes]:
    """Sample s: sample 1 is copy-padded at the start (past_mask False at row 0), sample 2 lacks the last
    future row (future_mask False at row 5). Images written t0 first to check that ordering follows image_names."""
    key = f"{s:08x}-16f0-469d-a996-8475e6828466"
    out: dict[str, bytes] = {"__key__": key}
    for idx in (0, -1):
        for cam in CAMS:
            name = f"{cam}_t{idx}"
            if name not in drop:
                out[f"{name}.jpg"] = _jpg(image_value(name))
    lowdim = lowdim_values(s)
    if drop_field:
        lowdim.pop(drop_field)
    past, future = np.zeros(T_WIN, bool), np.zeros(T_WIN, bool)
    past[0], future[1:] = s != 1, True
    if s == 2:
        future[5] = False
    extra = {"language_instruction": np.array(["the red ball"] * T_WIN), "intrinsics.scene_right_0": np.eye(3)[None]}
    out["lowdim.npz"] = npz_bytes({**lowdim, "past_mask": past, "future_mask": future, **extra})
    meta = {
        "episode_id": "episode_0", "sample_id": f"s{s}", "anchor_timestep": 10 + s, "anchor_relative_idx": 1,
        "image_timesteps": [9 + s, 10 + s], "past_padding": int(s == 1), "future_padding": 0,
        "camera_names": list(CAMS), "is_padded": s == 1,
    }  # fmt: skip
    out["metadata.json"] = json.dumps(meta, indent=2).encode()
    out["language_instructions.json"] = json.dumps(INSTR).encode()
    return out


def lbm_stats() -> dict:
    t = np.arange(T_WIN, dtype=np.float64)[:, None]
    return {
        PROP: {"mean": [0.0] * 3, "min": [0.0, 0.0, 0.0], "max": [200.0, 400.0, 800.0], "count": [3] * T_WIN},
        ACT: {"mean": [10.0, 20.0, 30.0], "std": [2.0, 4.0, 5.0], "count": [3] * T_WIN},
        GRIP: {
            "mean": [0.0],
            "percentile_1_per_timestep": t.tolist(),
            "percentile_99_per_timestep": (t + 4).tolist(),
            "count": [3] * T_WIN,
        },
    }


def write_lbm(root: str, samples: list[dict], *, cams=CAMS, past: int = 1, future: int = 4) -> str:
    manifest = write_shards(root, samples, samples_per_shard=8, prefix="shard_")
    config = {"camera_names": list(cams), "image_indices": [-1, 0], "past_lowdim_steps": past}
    config |= {"future_lowdim_steps": future, "padding_strategy": "copy", "type": "spartan"}
    with open(os.path.join(root, "preprocessing_config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    with open(os.path.join(root, "stats.json"), "w") as f:
        json.dump(lbm_stats(), f)
    return manifest


@pytest.fixture(scope="module")
def lbm(tmp_path_factory) -> str:
    return write_lbm(str(tmp_path_factory.mktemp("lbm")), [lbm_sample(s) for s in range(3)])


def lbm_data(manifest: str, **kw) -> RoboticsDataParams:
    root = os.path.dirname(manifest)
    field_configs = {
        PROP: FieldNormalizationParams(method="min_max"),
        GRIP: {"method": "percentile_1_99", "scope": "per_timestep"},
    }
    base = dict(
        dataset_manifest=[manifest],
        dataset_statistics=[os.path.join(root, "stats.json")],
        processor=PROCESSOR,
        img_num_tokens=2,
        max_text_seq_len=16,
        language_instruction_types=["original", "randomized"],
        action_fields=[ACT, GRIP],
        proprioception_fields=[PROP],
        lowdim_past_timesteps=1,
        lowdim_future_timesteps=2,
        normalization=NormalizationParams(field_configs=field_configs),
        num_workers=0,
    )
    return RoboticsDataParams(**{**base, **kw})


def eval_batch(data: RoboticsDataParams, manifest: str, n: int = 4) -> dict[str, np.ndarray]:
    (batch,) = list(build_eval_iterator(data, [manifest], global_batch_size=n))
    return batch


# ---------------------------------------------------------------- params


def test_params_resolution_from_dataset_files(lbm):
    data = lbm_data(lbm)
    assert data.normalization.centered_norm  # forced by the default std method
    assert isinstance(data.normalization.field_configs[GRIP], FieldNormalizationParams)
    r = resolve_robotics_data(data)
    assert r.camera_names == CAMS and r.image_indices == (-1, 0)
    assert r.image_names == ("scene_right_0_t-1", "wrist_left_plus_t-1", "scene_right_0_t0", "wrist_left_plus_t0")
    assert (r.action_dim, r.proprioception_dim) == (4, 3)
    assert (r.lowdim_past_timesteps, r.lowdim_future_timesteps) == (1, 2)
    n = r.normalization
    assert (n.lowdim_past_timesteps, n.lowdim_future_timesteps) == (1, 4) and n.include_fields == (PROP, ACT, GRIP)
    assert n.field_configs[ACT] == FieldNormalizationParams() and n.field_configs[PROP].method == "min_max"
    assert resolve_robotics_data(r) == r  # idempotent
    # unset windows default to the stats' window; JSON round trip keeps everything
    full = resolve_robotics_data(lbm_data(lbm, lowdim_past_timesteps=None, lowdim_future_timesteps=None))
    assert (full.lowdim_past_timesteps, full.lowdim_future_timesteps) == (1, 4)
    again = params_from_dict(json.loads(r.to_json()), family="data")
    assert again == r and again.normalization.field_configs[GRIP].scope == "per_timestep"


def test_gin_bindings_and_defaults():
    gin.clear_config()
    try:
        gin.parse_config(
            [
                "robotics.action_fields = ['a', 'b']",
                "robotics.normalization = @normalization()",
                "normalization.method = 'percentile_1_99'",
                "normalization.field_configs = {'a': @a/field_normalization(), 'b': {'scope': 'per_timestep'}}",
                "a/field_normalization.method = 'min_max'",
                "a/field_normalization.epsilon = 0.01",
            ]
        )
        data = RoboticsDataParams(dataset_manifest=["m"])
    finally:
        gin.clear_config()
    n = data.normalization
    assert data.type == "robotics" and data.action_fields == ("a", "b") and not n.centered_norm
    assert n.field_configs["a"] == FieldNormalizationParams(method="min_max", epsilon=0.01)
    assert n.field_configs["b"] == FieldNormalizationParams(scope="per_timestep")
    assert n.field_config("b_rel") is n.field_configs["b"]  # substring fallback, as the original
    assert params_from_dict(json.loads(data.to_json()), family="data") == data
    d = RoboticsDataParams()
    assert (d.processor, d.img_num_tokens, d.image_size, d.max_text_seq_len) == (None, 256, 224, None)
    assert d.language_instruction_types == ("original",) and d.point_cloud_num_points == 4096
    assert (d.normalization.method, d.normalization.scope, d.normalization.epsilon) == ("std", "global", 1e-8)
    assert d.action_dim is None and d.proprioception_dim is None and d.lowdim_past_timesteps is None


def test_resolve_experiment_fills_diffusion_policy_dims(lbm):
    def exp(**model_kw):
        return TrainExperimentParams(
            model=DiffusionPolicyParams(transformer=TransformerParams(), **model_kw),
            data=lbm_data(lbm),
            total_train_samples=8,
            hparams=HyperParams(seed=3),
        )

    resolved = resolve_experiment(exp())
    assert (resolved.model.action_dim, resolved.model.proprioception_dim) == (4, 3)
    assert resolved.data.action_dim == 4 and resolved.data.seed == 3 and resolved.data.image_names
    assert resolve_experiment(exp(action_dim=4, proprioception_dim=3)).model.action_dim == 4
    with pytest.raises(
        ParamsError, match=r"diffusion_policy.action_dim = 7 but the robotics data gives action_dim = 4"
    ):
        resolve_experiment(exp(action_dim=7))
    with pytest.raises(ParamsError, match=r"proprioception_dim = 5 but .* = 3"):
        resolve_experiment(exp(proprioception_dim=5))
    uncentered = exp().replace(data=lbm_data(lbm, normalization=NormalizationParams(method="min_max")))
    with pytest.raises(ParamsError, match=r"clamp_range .* symmetric but normalization.centered_norm is False"):
        resolve_experiment(uncentered)


def test_param_errors(lbm, tmp_path):
    root = os.path.dirname(lbm)
    with pytest.raises(ParamsError, match=r"mask_padded_images = True requires robotics.pad_missing_images"):
        lbm_data(lbm, mask_padded_images=True)
    with pytest.raises(ParamsError, match=r"unknown types \['fancy'\]"):
        lbm_data(lbm, language_instruction_types=["original", "fancy"])
    with pytest.raises(ParamsError, match="tactile inputs are not supported"):
        lbm_data(lbm, tactile_fields=["tactile__left"])
    with pytest.raises(ParamsError, match="point clouds are not supported"):
        lbm_data(lbm, use_point_cloud=True)
    with pytest.raises(ParamsError, match=r"normalization.method = 'zscore'"):
        NormalizationParams(method="zscore")
    with pytest.raises(ParamsError, match=r"field_normalization.scope = 'episode'"):
        NormalizationParams(field_configs={ACT: {"scope": "episode"}})
    missing = os.path.join(str(tmp_path), "nowhere", "stats.json")
    with pytest.raises(ParamsError, match=r"nowhere/stats.json.* not found.*robotics.dataset_statistics"):
        resolve_robotics_data(lbm_data(lbm, dataset_statistics=[missing]))
    with pytest.raises(ParamsError, match=r"robotics.dataset_statistics is empty"):
        resolve_robotics_data(lbm_data(lbm, dataset_statistics=[]))
    with pytest.raises(ParamsError, match=r"robotics.action_dim = 5 but the action fields .* have 4 features"):
        resolve_robotics_data(lbm_data(lbm, action_dim=5))
    with pytest.raises(ParamsError, match=r"robotics.proprioception_dim = 2 but .* have 3 features"):
        resolve_robotics_data(lbm_data(lbm, proprioception_dim=2))
    with pytest.raises(ParamsError, match=r"action_fields entry 'robot__nope' is not in the statistics"):
        resolve_robotics_data(lbm_data(lbm, action_fields=["robot__nope"]))
    with pytest.raises(ParamsError, match=r"robotics.action_fields is empty"):
        resolve_robotics_data(lbm_data(lbm, action_fields=[]))
    with pytest.raises(ParamsError, match=r"robotics.lowdim_future_timesteps = 5 exceeds the 4 steps"):
        resolve_robotics_data(lbm_data(lbm, lowdim_future_timesteps=5))
    # a second dataset whose preprocessing config names other cameras
    other = write_lbm(str(tmp_path / "other"), [lbm_sample(0)], cams=("scene_left_0",))
    with pytest.raises(ParamsError, match=r"camera_names is unset and the datasets disagree"):
        resolve_robotics_data(lbm_data(lbm, dataset_manifest=[lbm, other]))
    resolve_robotics_data(
        lbm_data(lbm, dataset_manifest=[lbm, other], camera_names=list(CAMS))
    )  # explicit cameras: fine
    os.makedirs(tmp_path / "bare")
    bare = write_shards(str(tmp_path / "bare"), [lbm_sample(0)], samples_per_shard=4)
    with pytest.raises(ParamsError, match=r"preprocessing_config.yaml.*set robotics.camera_names"):
        resolve_robotics_data(lbm_data(lbm, dataset_manifest=[bare]))
    with pytest.raises(DataError, match=r"robotics.processor is not set"):
        robotics_transform(lbm_data(lbm, processor=None))
    assert os.path.isfile(os.path.join(root, "stats.json"))


# ---------------------------------------------------------------- normalisation by hand

STATS = {
    "f": {
        "mean": [1.0, -2.0], "std": [2.0, 4.0], "min": [0.0, -10.0], "max": [4.0, 10.0],
        "percentile_1": [0.5, -8.0], "percentile_99": [3.5, 8.0], "percentile_5": [1.0, -6.0],
        "percentile_95": [3.0, 6.0],
        # 4 rows: past 1, current, future 2
        "mean_per_timestep": [[t, 10.0 * t] for t in range(4)],
        "std_per_timestep": [[1.0 + t, 2.0] for t in range(4)],
        "min_per_timestep": [[-t, 0.0] for t in range(4)],
        "max_per_timestep": [[t, 4.0] for t in range(4)],
    },
    "zero": {"mean": [3.0], "std": [0.0]},
    "past_mask": {"mean": [0.5], "std": [0.5]},
}  # fmt: skip


def normalizer(method="std", scope="global", centered=False, eps=1e-8, enabled=True, fields=("f", "zero")):
    norm = NormalizationParams(
        enabled=enabled, method=method, scope=scope, epsilon=eps, centered_norm=centered,
        include_fields=[*fields, "past_mask"], lowdim_past_timesteps=1, lowdim_future_timesteps=2,
        field_configs={f: FieldNormalizationParams(method=method, scope=scope, epsilon=eps) for f in fields},
    )  # fmt: skip
    data = RoboticsDataParams(action_fields=["f", "zero"], normalization=norm, lowdim_past_timesteps=1)
    return Normalizer.from_stats(copy.deepcopy(STATS), data)


@pytest.mark.parametrize(
    ("method", "centered", "expect"),
    [
        ("std", False, [(3 - 1) / 2, (2 + 2) / 4]),
        ("min_max", False, [(3 - 0) / 4, (2 + 10) / 20]),
        ("min_max", True, [(3 - 2) / 2, (2 - 0) / 10]),  # center = min + range/2, scale = range/2
        ("percentile_1_99", False, [(3 - 0.5) / 3, (2 + 8) / 16]),
        ("percentile_1_99", True, [(3 - 2) / 1.5, (2 - 0) / 8]),
        ("percentile_5_95", False, [(3 - 1) / 2, (2 + 6) / 12]),
        ("percentile_5_95", True, [(3 - 2) / 1, (2 - 0) / 6]),
    ],
)
def test_normalize_global_by_hand(method, centered, expect):
    n = normalizer(method, centered=centered)
    x = np.array([[3.0, 2.0], [3.0, 2.0]])
    np.testing.assert_allclose(n.normalize("f", x), [expect, expect], rtol=1e-6)
    np.testing.assert_allclose(n.denormalize("f", n.normalize("f", x)), x, rtol=1e-6)


def test_normalize_per_timestep_alignment_epsilon_and_skips():
    n = normalizer("std", "per_timestep")
    x = np.array([[[5.0, 20.0], [5.0, 20.0], [5.0, 20.0]]])  # [1, 3, 2]
    # current step at row 1 of x <-> stats row 1: x rows use stats rows 0, 1, 2
    rows = np.arange(3)
    expect = np.stack([(5.0 - rows) / (1 + rows), (20.0 - 10 * rows) / 2], -1)
    np.testing.assert_allclose(n.normalize("f", x, anchor=1)[0], expect, rtol=1e-6)
    # current step at row 0: stats rows 1, 2, 3
    expect0 = np.stack([(5.0 - rows - 1) / (2 + rows), (20.0 - 10 * (rows + 1)) / 2], -1)
    np.testing.assert_allclose(n.normalize("f", x, anchor=0)[0], expect0, rtol=1e-6)
    np.testing.assert_allclose(n.denormalize("f", n.normalize("f", x, anchor=0), anchor=0), x, rtol=1e-6)
    # default anchor = data.lowdim_past_timesteps = 1
    np.testing.assert_allclose(n.normalize("f", x), n.normalize("f", x, anchor=1))
    with pytest.raises(DataError, match=r"needs stats rows 1..5, but the stats hold rows 0..3"):
        n.normalize("f", np.zeros((1, 5, 2)), anchor=0)
    # denormalising beyond the stats repeats the edge rows (a longer predicted horizon)
    long = n.denormalize("f", np.zeros((1, 6, 2)), anchor=1)[0]
    np.testing.assert_allclose(long[:, 0], [0, 1, 2, 3, 3, 3])
    # per-timestep min_max centred: row r has min (-r, 0), max (r, 4) -> center (0, 2), scale (r, 2), floored at eps
    mm = normalizer("min_max", "per_timestep", centered=True, eps=0.25)
    got = mm.normalize("f", np.ones((3, 2)), anchor=1)
    np.testing.assert_allclose(got[:, 0], [1 / 0.25, 1 / 1, 1 / 2])  # scale max(r, 0.25) for rows 0, 1, 2
    np.testing.assert_allclose(got[:, 1], [(1 - 2) / 2] * 3)
    # epsilon floors a zero std; skipped and disabled fields pass through
    np.testing.assert_allclose(normalizer(eps=0.5).normalize("zero", np.array([[4.0]])), [[2.0]])
    np.testing.assert_allclose(normalizer().normalize("past_mask", np.array([[1.0]])), [[1.0]])
    np.testing.assert_allclose(normalizer(fields=("zero",)).normalize("f", np.ones((1, 2))), np.ones((1, 2)))
    np.testing.assert_allclose(normalizer(enabled=False).normalize("f", np.ones((1, 2))), np.ones((1, 2)))
    # actions = concat(f, zero): split, denormalised per field, concatenated again
    n = normalizer()
    acts = np.array([[[1.0, 1.0, 1.0]]])
    np.testing.assert_allclose(n.denormalize_actions(acts), [[[1 * 2 + 1, 1 * 4 - 2, 1 * 1e-8 + 3]]], rtol=1e-6)
    with pytest.raises(DataError, match="actions have 2 features but the action fields"):
        n.denormalize_actions(np.zeros((1, 2)))


def test_stats_of_the_generator_and_merging_match_numpy():
    rng = np.random.default_rng(0)

    def windows(n):
        return [
            {"a": rng.normal(size=(4, 2)) * [1, 3] + [0, 5], "mask": rng.random(4) < 0.8 + np.array([1, 0, 0, 0])}
            for _ in range(n)
        ]

    wa, wb = windows(30), windows(50)
    sa, sb, sab = (compute_stats(w, ("a",))["a"] for w in (wa, wb, wa + wb))
    x = np.stack([w["a"] for w in wa])
    m = np.stack([w["mask"] for w in wa])
    np.testing.assert_allclose(sa["count"], m.sum(0))
    np.testing.assert_allclose(sa["mean"], x[m].mean(0), atol=1e-7)  # count-weighted row means = masked mean
    np.testing.assert_allclose(sa["min"], x[m].min(0), atol=1e-7)
    np.testing.assert_allclose(sa["std_per_timestep"][2], x[m[:, 2], 2].std(0, ddof=1), atol=1e-7)
    np.testing.assert_allclose(sa["percentile_99"], np.percentile(x[m], 99, axis=0), atol=1e-7)
    # merging two files: per-timestep mean / pooled std equal the statistics of the union (exact)
    merged = merge_stats([{"a": sa}, {"a": sb}])["a"]
    for key in ("mean_per_timestep", "std_per_timestep", "min", "max", "count", "mean", "std"):
        np.testing.assert_allclose(merged[key], sab[key], atol=1e-6, err_msg=key)


# ---------------------------------------------------------------- reading the LBM layout


def test_lbm_batch_windows_normalisation_images_text(lbm):
    data = lbm_data(lbm)
    b = eval_batch(data, lbm)
    assert b["valid"].tolist() == [True, True, True, False]
    assert b["actions"].shape == (4, 4, 4) and b["actions"].dtype == np.float32
    assert b["proprioception"].shape == (4, 2, 3) and b["pixel_values"].shape == (4, 4, 32, 32, 3)
    assert b["input_ids"].dtype == np.int32 and b["attention_mask"].dtype == np.int32
    assert b["attention_mask_images"].dtype == np.bool_ and b["attention_mask_images"][:3].all()
    assert not {"intrinsics", "metadata", "lowdim"} & set(b)
    for s in range(3):
        v = lowdim_values(s)
        rows = slice(0, 4)  # anchor row 1, past 1, future 2
        act = (v[ACT][rows] - [10, 20, 30]) / [2, 4, 5]
        grip = (v[GRIP][rows] - (np.arange(4)[:, None] + 2)) / 2  # p1 = t, p99 = t + 4, centred; rows 0..3
        np.testing.assert_allclose(b["actions"][s], np.concatenate([act, grip], -1), rtol=1e-6)
        prop = (v[PROP][0:2] - [100, 200, 400]) / [100, 200, 400]
        np.testing.assert_allclose(b["proprioception"][s], prop, rtol=1e-6, atol=1e-7)
    assert b["past_mask"][:3].tolist() == [[True, False, False, False], [False] * 4, [True, False, False, False]]
    assert b["future_mask"][:3].tolist() == [[False, True, True, True]] * 3
    assert not b["future_mask"][3].any()  # padding row
    # images time-major / camera-minor, whatever the member order; processor maps [0, 255] -> [-1, 1]
    names = ("scene_right_0_t-1", "wrist_left_plus_t-1", "scene_right_0_t0", "wrist_left_plus_t0")
    want = np.array([image_value(n) for n in names]) / 255 * 2 - 1
    np.testing.assert_allclose(b["pixel_values"][:3].mean((2, 3, 4)), np.tile(want, (3, 1)), atol=0.02)
    # text: "<image> " x 4 then an instruction of the configured types
    ids, mask = b["input_ids"][0], b["attention_mask"][0]
    assert (ids[:8] == IMAGE_ID).all() and mask[:8].all()
    n = int(mask.sum())
    proc = load_processor(PROCESSOR, image_size=224, img_num_tokens=2)
    assert proc.tokenizer.decode(ids[8:n]) in {*INSTR["original"], *INSTR["randomized"]}
    assert (ids[n:] == PAD_ID).all() and not mask[n:].any()


def test_instruction_choice_is_seeded_and_covers_the_types(lbm):
    samples = [lbm_sample(s % 3) for s in range(24)]
    for i, s in enumerate(samples):
        s["__key__"] = f"{i:04d}"
    root = os.path.dirname(lbm)
    manifest = write_shards(os.path.join(root, "many"), samples, samples_per_shard=24)
    data = lbm_data(manifest, dataset_statistics=[os.path.join(root, "stats.json")], shuffle=False)
    data = data.replace(camera_names=list(CAMS), image_indices=[-1, 0])
    proc = load_processor(PROCESSOR, image_size=224, img_num_tokens=2)

    def texts(d):
        (batch,) = list(build_train_iterator(d, global_batch_size=24, num_batches=1))
        return [
            proc.tokenizer.decode(row[8 : m.sum()])
            for row, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]

    first = texts(data)
    assert first == texts(data)  # fixed by (seed, index)
    assert set(first) == {"the red ball", "a blue box", "the green kite"}
    assert set(texts(data.replace(language_instruction_types=["original"]))) == {"the red ball"}
    assert texts(data.replace(seed=7)) != first
    # unit: union in type order, str entries, nothing -> ""
    rng = np.random.default_rng(0)
    assert select_instruction({"original": "a", "verbose": ["b"]}, ["verbose"], rng) == "b"
    assert {select_instruction({"original": "a", "randomized": ["b", "c"]}, ["original", "randomized"], rng)
            for _ in range(40)} == {"a", "b", "c"}  # fmt: skip
    assert select_instruction({"original": ["a"]}, ["alternative"], rng) == "" == select_instruction(None, ["x"], rng)


def test_missing_images_padding_and_sample_errors(lbm, tmp_path):
    holes = write_lbm(str(tmp_path / "holes"), [lbm_sample(0), lbm_sample(1, drop=("wrist_left_plus_t-1",))])
    data = lbm_data(holes)
    with pytest.raises(DataError, match=r"no image 'wrist_left_plus_t-1' .*images present: \['scene_right_0_t-1', "):
        eval_batch(data, holes, 2)
    b = eval_batch(data.replace(pad_missing_images=True), holes, 2)
    assert b["attention_mask_images"].tolist() == [[True] * 4] * 2  # the original (LBM 1.0) does not mask them
    np.testing.assert_allclose(b["pixel_values"][1, 1], -1.0)  # a zero image through the processor
    b = eval_batch(data.replace(pad_missing_images=True, mask_padded_images=True), holes, 2)
    assert b["attention_mask_images"].tolist() == [[True] * 4, [True, False, True, True]]
    no_grip = write_lbm(str(tmp_path / "nogrip"), [lbm_sample(0, drop_field=GRIP)])
    with pytest.raises(DataError, match=r"lowdim field 'robot__desired__grippers__left::panda_hand' .* not in lowdim"):
        eval_batch(lbm_data(no_grip), no_grip, 1)
    with pytest.raises(DataError, match=r"cannot take 2 past and 1 future steps around row 1 of a 6-step"):
        crop_window(np.zeros((6, 2)), 1, 2, 1)
    np.testing.assert_array_equal(crop_window(np.arange(6), 3, 2, 1), [1, 2, 3, 4])
    # the prompt must fit: seq_len without max_text_seq_len raises, max_text_seq_len truncates words only
    with pytest.raises(DataError, match=r"needs 11 tokens .* robotics.seq_len = 10"):
        eval_batch(lbm_data(lbm, max_text_seq_len=None, seq_len=10, language_instruction_types=["original"]), lbm)
    b = eval_batch(lbm_data(lbm, max_text_seq_len=9), lbm)
    assert b["input_ids"].shape == (4, 9) and b["attention_mask"][:3].all()
    with pytest.raises(DataError, match="would cut image tokens"):
        eval_batch(lbm_data(lbm, max_text_seq_len=6), lbm)
    assert image_key("observation.images.cam_t0.jpg") == ("observation.images.cam_t0", "cam_t0")
    assert image_key("scene_t-1.PNG") == ("scene_t-1", "scene_t-1") and image_key("lowdim.npz") is None


def test_chat_template_and_joint_augmentation(lbm):
    proc = load_processor(PROCESSOR, image_size=224, img_num_tokens=2)
    assert robotics_text(proc, 2, "the red ball") == "<image> <image> the red ball"
    tok = copy.deepcopy(proc.tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %} .{% endfor %}"
    )
    templated = VLMProcessor(tok, proc.image_config, img_num_tokens=2)
    assert robotics_text(templated, 2, "the red ball") == "<image><image>the red ball ."
    # same jitter for every image of a sample: equal raw images stay equal
    same = write_lbm(os.path.join(os.path.dirname(lbm), "same"), [lbm_sample(0)])
    aug = DataAugmentationParams(
        image=ImageAugmentationParams(
            color_jitter=ColorJitterParams(enabled=True, brightness=0.5, contrast=0.0, saturation=0.0, hue=(0, 0)),
            crop=CropParams(enabled=True, shape=(12, 12)),
        )
    )
    data = lbm_data(same, augmentation=aug, lowdim_future_timesteps=2)
    (b,) = list(build_train_iterator(data, global_batch_size=1, num_batches=1))
    px = b["pixel_values"][0]  # [4, 32, 32, 3], cropped 12x12 then resized
    raw = (px.mean((1, 2, 3)) + 1) / 2 * 255
    factor = raw[3] / 170
    assert abs(factor - 1) > 0.02
    np.testing.assert_allclose(raw, np.array([20, 70, 120, 170]) * factor, atol=2.0)  # one factor for all images


# ---------------------------------------------------------------- the tiny reach task


@pytest.fixture(scope="module")
def reach(tmp_path_factory) -> dict[str, str]:
    return make_tiny_robotics_datasets(str(tmp_path_factory.mktemp("reach")), num_train=40, num_val=12)


def test_reach_dataset_matches_the_env_and_the_contract(reach):
    manifest = reach["reach_val"]
    data = resolve_robotics_data(reach_data(manifest))
    assert (data.image_names, data.action_dim, data.proprioception_dim) == (("scene_t0",), 2, 2)
    assert (data.lowdim_past_timesteps, data.lowdim_future_timesteps) == (1, 7)
    b = eval_batch(data, manifest, 12)
    shapes = {k: (v.dtype.name, v.shape) for k, v in b.items()}
    assert shapes == {
        "input_ids": ("int32", (12, 12)), "attention_mask": ("int32", (12, 12)),
        "pixel_values": ("float32", (12, 1, 32, 32, 3)), "attention_mask_images": ("bool", (12, 1)),
        "actions": ("float32", (12, 9, 2)), "past_mask": ("bool", (12, 9)), "future_mask": ("bool", (12, 9)),
        "proprioception": ("float32", (12, 2, 2)), "valid": ("bool", (12,)),
    }  # fmt: skip
    norm = Normalizer.from_stats(list(data.dataset_statistics), data)
    proc = load_processor(PROCESSOR, image_size=224, img_num_tokens=1)
    src = ShardDataSource(manifest)
    for i in range(12):
        raw = np.load(io.BytesIO(src[i]["lowdim.npz"]))
        meta = json.loads(src[i]["metadata.json"])
        np.testing.assert_allclose(norm.denormalize_actions(b["actions"][i]), raw[ACTION_FIELD], atol=1e-5)
        agent = norm.denormalize(PROPRIO_FIELD, b["proprioception"][i])
        np.testing.assert_allclose(agent, raw[PROPRIO_FIELD][:2], atol=1e-5)
        assert b["future_mask"][i, 1] and b["past_mask"][i, 0] == (meta["anchor_timestep"] > 0)
        # the current action is the expert's command from the current state; padded rows repeat the last one
        a, s = raw[ACTION_FIELD], raw[PROPRIO_FIELD]
        step = np.hypot(*(a[1] - s[1]))
        assert step <= MAX_STEP + 1e-9
        # the image is the env's rendering of the current state (PNG: lossless)
        from PIL import Image

        img = np.asarray(Image.open(io.BytesIO(src[i]["scene_t0.png"])))
        assert img.shape == (32, 32, 3) and (img == 255).any()
        np.testing.assert_allclose(b["pixel_values"][i, 0], proc.preprocess_image(img), atol=1e-6)
        words = proc.tokenizer.decode(b["input_ids"][i][1 : b["attention_mask"][i].sum()])
        assert words.startswith("[UNK] to the ") and words.split()[3] in ("red", "green", "blue", "yellow")


def test_reach_env_and_expert():
    env = ReachEnv(max_steps=20)
    obs = env.reset(seed=5)
    setup = env.setup
    np.testing.assert_array_equal(obs["image"], render(setup.agent, setup.target, setup.colour))
    assert obs["instruction"] == f"move to the {setup.colour} target" and obs["image"].dtype == np.uint8
    for _ in range(20):  # the expert reaches the target well within the episode lengths of the dataset
        obs, done, success = env.step(env.expert_action())
        if done:
            break
    assert success and np.hypot(*(obs["agent_xy"] - setup.target)) <= SUCCESS_RADIUS
    env.reset(seed=5)
    far = env.agent + np.array([3.0, 0.0])
    obs, done, success = env.step(far)  # commands are clipped to MAX_STEP and to the square
    assert np.isclose(np.hypot(*(obs["agent_xy"] - setup.agent)), min(MAX_STEP, 1 - setup.agent[0]))
    np.testing.assert_allclose(expert_action(np.zeros(2), np.array([0.05, 0.0])), [0.05, 0.0])
    np.testing.assert_allclose(expert_action(np.zeros(2), np.array([0.3, 0.4])), [0.09, 0.12])
    rng = np.random.default_rng(0)
    wins = 0
    for seed in range(20):
        env.reset(seed)
        done = False
        while not done:
            _, done, success = env.step(rng.uniform(-1, 1, 2))
        wins += success
    assert wins < 10
    assert env.reset(seed=5)["agent_xy"].tolist() == setup.agent.tolist()  # seeded


def test_iterator_resume_with_augmentation(reach):
    aug = DataAugmentationParams(
        image=ImageAugmentationParams(
            color_jitter=ColorJitterParams(enabled=True), crop=CropParams(enabled=True, shape=(0.9, 0.9))
        )
    )
    data = reach_data(reach["reach_train"], augmentation=aug, language_instruction_types=["original", "randomized"])
    full = list(build_train_iterator(data, global_batch_size=4, num_batches=5))
    it = build_train_iterator(data, global_batch_size=4, num_batches=5)
    next(it), next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = build_train_iterator(data, global_batch_size=4, num_batches=5)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == 3
    for a, b in zip(full[2:], rest, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # two hosts: their rows concatenate to the single-process batch
    halves = [list(build_train_iterator(data, global_batch_size=4, num_batches=2, process_index=p, process_count=2))
              for p in range(2)]  # fmt: skip
    np.testing.assert_array_equal(
        np.concatenate([halves[0][1]["actions"], halves[1][1]["actions"]]), full[1]["actions"]
    )


def test_bundled_reach_data_is_small_deterministic_and_readable(tmp_path):
    sizes = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(REACH) for f in fs]
    assert sum(sizes) < 3e6
    for split in ("train", "val"):
        for name in ("manifest.jsonl", "stats.json", "preprocessing_config.yaml", "processing_metadata.json"):
            assert os.path.isfile(os.path.join(REACH, split, name))
    val = write_reach_split(str(tmp_path / "val"), num_samples=64, seed=12, samples_per_shard=136)
    for name in (
        "shard-0000.tar",
        "stats.json",
        "manifest.jsonl",
        "preprocessing_config.yaml",
        "processing_metadata.json",
    ):
        with (
            open(os.path.join(os.path.dirname(val), name), "rb") as f,
            open(os.path.join(REACH, "val", name), "rb") as g,
        ):
            assert f.read() == g.read(), name
    data = resolve_robotics_data(reach_data(os.path.join(REACH, "train", "manifest.jsonl")))
    assert len(ShardDataSource(data.dataset_manifest[0])) == 544 and data.action_dim == 2
    b = next(build_train_iterator(data, global_batch_size=8, num_batches=1))
    assert b["actions"].shape == (8, 9, 2) and np.isfinite(b["actions"]).all()
