"""The torch ``.pt`` reader / writer without torch: files of the real ``torch.save`` read back equal, our files load
in ``torch.load(weights_only=True)``, and a pickle that would run code or a cut file is refused."""

from __future__ import annotations

import collections
import os

import ml_dtypes
import numpy as np
import pytest
import torch

from vla_foundry_jax.convert.torch_pickle import TensorRef, TorchPickleError, load_pt, save_pt, to_numpy


def _equal(ours: np.ndarray, theirs: torch.Tensor) -> bool:
    if theirs.dtype == torch.bfloat16:
        bits = theirs.view(torch.int16).numpy().view(np.uint16)
        return ours.dtype == ml_dtypes.bfloat16 and np.array_equal(ours.view(np.uint16), bits)
    return ours.dtype == theirs.numpy().dtype and np.array_equal(ours, theirs.numpy())


def test_reads_torch_save_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    layer = torch.nn.Linear(3, 2)
    tensors = {
        "f32": base,
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "i64": torch.arange(5),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([200, 1], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "view": base[1:3, 2:],  # offset into a shared storage
        "transposed": base.t(),  # strides
        "tied": base,
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    obj = {
        "state_dict": layer.state_dict(),  # OrderedDict with _metadata (BUILD)
        "tensors": tensors,
        "checkpoint_num": 3,
        "samples_seen": 10**12,
        "lr": 1e-4,
        "names": ["a", "b"],
        "pair": (1, "x"),
        "blob": b"\x00\xff",
        "none": None,
        "size": torch.Size([2, 3]),
        "counts": collections.Counter("aab"),
        "tags": {"x", "y"},
    }
    torch.save(obj, tmp_path / "x.pt")
    loaded = load_pt(str(tmp_path / "x.pt"))
    assert isinstance(loaded["tensors"]["f32"], TensorRef) and loaded["tensors"]["bf16"].shape == (4, 6)
    got = to_numpy(loaded)
    for name, t in tensors.items():
        assert _equal(got["tensors"][name], t.detach()), name
    for name, t in layer.state_dict().items():
        assert _equal(got["state_dict"][name], t), name
    assert list(got["state_dict"]) == ["weight", "bias"]
    assert {k: got[k] for k in ("checkpoint_num", "samples_seen", "lr", "names", "pair", "blob", "none")} == {
        "checkpoint_num": 3,
        "samples_seen": 10**12,
        "lr": 1e-4,
        "names": ["a", "b"],
        "pair": (1, "x"),
        "blob": b"\x00\xff",
        "none": None,
    }
    assert tuple(got["size"]) == (2, 3) and got["counts"] == {"a": 2, "b": 1} and got["tags"] == {"x", "y"}


def test_writer_output_loads_in_torch_weights_only(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 5)).astype(np.float32)
    arrays = {
        "f32": a,
        "transposed": a.T,  # written contiguous
        "bf16": a.astype(ml_dtypes.bfloat16),
        "f16": a.astype(np.float16),
        "i64": np.arange(4),
        "bool": np.array([True, False]),
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 2), np.float32),
    }
    obj = {
        "state_dict": collections.OrderedDict(arrays),
        "checkpoint_num": 7,
        "global_step": 70,
        "datastrings": ["s3://x"],
        "blob": b"ab",
    }
    save_pt(obj, str(tmp_path / "ours.pt"))
    loaded = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert list(loaded["state_dict"]) == list(arrays)
    for name, value in arrays.items():
        t = loaded["state_dict"][name]
        assert tuple(t.shape) == value.shape, name
        assert _equal(value if value.flags.c_contiguous else np.ascontiguousarray(value), t), name
    assert (loaded["checkpoint_num"], loaded["global_step"], loaded["datastrings"], loaded["blob"]) == (
        7,
        70,
        ["s3://x"],
        b"ab",
    )
    again = to_numpy(load_pt(str(tmp_path / "ours.pt")))  # and our reader reads our writer
    assert all(np.array_equal(again["state_dict"][k], v) for k, v in arrays.items())
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"w": torch.ones(2), "x": _RunsCode(str(marker))}}, tmp_path / "evil.pt")
    with pytest.raises(TorchPickleError, match=r"evil\.pt refers to the global (posix|os)\.system"):
        load_pt(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.save({"f": _Unlisted()}, tmp_path / "class.pt")  # any class outside the allow-list, harmless or not
    with pytest.raises(TorchPickleError, match=r"test_torch_pickle\._Unlisted"):
        load_pt(str(tmp_path / "class.pt"))


class _Unlisted:
    pass


def test_truncated_and_foreign_files(tmp_path):
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(TorchPickleError, match=r"cut\.pt.*(truncated|damaged)"):
            to_numpy(load_pt(str(tmp_path / "cut.pt")))
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(TorchPickleError, match=r"text\.pt: not a readable torch zip archive"):
        load_pt(str(tmp_path / "text.pt"))
    torch.save({"w": torch.ones(1)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(TorchPickleError, match=r"pre-1\.6 torch pickle"):
        load_pt(str(tmp_path / "legacy.pt"))
