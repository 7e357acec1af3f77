"""The path layer against real stores on loopback: moto's S3 server (directly and behind a fault-injecting proxy),
gcp-storage-emulator, and the Hugging Face hub cache read offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fixtures.object_store import free_port, subprocess_env
from tests.fixtures.paths import ROOT
from vla_foundry_jax import paths


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(paths, "_BACKOFF_S", 0.01)
    paths.RETRIES.clear()


def test_unsupported_scheme_names_the_path_and_the_schemes():
    with pytest.raises(paths.PathError, match=r"'ftp://host/x'.*ftp://.*not supported.*s3://"):
        paths.exists("ftp://host/x")
    with pytest.raises(paths.PathError, match="dataset_statistics"):
        paths.check_readable("http://host/stats.json", "dataset_statistics")


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_round_trip_listing_local_copies_and_moves(store, request):
    handle = request.getfixturevalue(store)
    root = handle.bucket()
    paths.write_text(paths.join(root, "run/a.txt"), "alpha")
    paths.write_bytes(paths.join(root, "run/sub/b.bin"), bytes(range(256)) * 40)
    assert paths.read_text(f"{root}/run/a.txt") == "alpha"
    assert paths.read_bytes(f"{root}/run/sub/b.bin", 10, 20) == bytes(range(10, 20))
    assert paths.listdir(f"{root}/run") == ["a.txt", "sub"]
    assert paths.isdir(f"{root}/run/sub") and not paths.isdir(f"{root}/run/a.txt")
    assert paths.size(f"{root}/run/sub/b.bin") == 256 * 40
    local = paths.local_dir(f"{root}/run")
    with open(os.path.join(local, "sub", "b.bin"), "rb") as f:
        assert f.read() == bytes(range(256)) * 40
    paths.move(f"{root}/run/sub", f"{root}/aside/sub")
    assert paths.listdir(root) == ["aside", "run"]
    assert not paths.exists(f"{root}/run/sub/b.bin") and paths.exists(f"{root}/aside/sub/b.bin")
    paths.check_writable(f"{root}/run", "experiment.output_dir")
    # a changed object behind the same URL is fetched again, never served stale from the cache
    first = paths.local_file(f"{root}/run/a.txt")
    paths.write_text(f"{root}/run/a.txt", "beta, longer")
    with open(paths.local_file(f"{root}/run/a.txt")) as f:
        assert f.read() == "beta, longer"
    with open(first) as f:
        assert f.read() == "alpha"
    with open(os.path.join(paths.local_dir(f"{root}/run"), "a.txt")) as f:
        assert f.read() == "beta, longer"


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_missing_object_and_missing_bucket_are_one_line_errors(store, request):
    handle = request.getfixturevalue(store)
    root = handle.bucket()
    with pytest.raises(paths.PathError, match=rf"'{root}/nothing.json': no such file"):
        paths.read_bytes(f"{root}/nothing.json")
    with pytest.raises(paths.PathError, match=r"dataset_statistics.*no such file"):
        paths.check_readable(f"{root}/nothing.json", "dataset_statistics")
    scheme = root.split("://")[0]
    with pytest.raises(paths.PathError, match="no-such-bucket-9z") as info:
        paths.read_bytes(f"{scheme}://no-such-bucket-9z/x.json")
    assert "\n" not in str(info.value)
    with pytest.raises(paths.PathError, match=r"experiment.output_dir.*no-such-bucket-9z.*(bucket|no such)"):
        paths.check_writable(f"{scheme}://no-such-bucket-9z/run", "experiment.output_dir")


def test_s3_missing_bucket_names_the_bucket_fix(s3):
    with pytest.raises(paths.PathError, match=r"bucket does not exist.*check the bucket name"):
        paths.read_bytes("s3://no-such-bucket-9z/x.json")


def test_unreachable_endpoint_is_retried_then_names_the_variable(s3, fast_retries, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    from tests.fixtures.object_store import clear_fs_caches

    clear_fs_caches()
    with pytest.raises(paths.PathError, match=r"'s3://bucket/x': unreachable after 6 attempts.*AWS_ENDPOINT_URL"):
        paths.read_bytes("s3://bucket/x")
    assert paths.RETRIES["s3"] == paths.MAX_ATTEMPTS - 1


@pytest.mark.parametrize("port", [40355, 40412, 50012])
def test_a_port_that_contains_a_status_code_is_not_read_as_one(port):
    # the endpoint's port once read as HTTP 403 (access denied) / 404 (no such file) / 500 (transient)
    refused = ConnectionError(f'Could not connect to the endpoint URL: "http://127.0.0.1:{port}/bucket/x"')
    assert "unreachable after" in str(paths.explain(refused, "s3://bucket/x"))
    assert "access denied" in str(paths.explain(OSError("An error occurred (403) when calling GetObject"), "s3://b/x"))
    assert "no such file" in str(paths.explain(OSError("HTTP 404 for gs://b/x"), "gs://b/x"))
    assert not paths._is_transient(ValueError(f"bad value in http://127.0.0.1:{port}/x"))


def test_no_credentials_names_the_variables(s3, monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    from tests.fixtures.object_store import clear_fs_caches

    clear_fs_caches()
    root = s3.bucket()
    with pytest.raises(paths.PathError, match=rf"'{root}/x.json.*no credentials.*AWS_ACCESS_KEY_ID"):
        paths.check_writable(f"{root}/x.json", "experiment.output_dir")


@pytest.mark.parametrize("mode", ["500", "drop", "short"])
def test_faults_are_retried_counted_and_never_give_partial_bytes(s3, fast_retries, mode):
    root = s3.bucket()
    blobs = {f"{root}/obj{i}.bin": os.urandom(3000 + i) for i in range(6)}
    proxy = s3.faults(0.15, mode)
    for path, data in blobs.items():
        paths.write_bytes(path, data)
    for path, data in blobs.items():
        assert paths.read_bytes(path) == data
        assert paths.read_bytes(path, 100, 1100) == data[100:1100]
    assert proxy.failed > 0
    if mode == "500":  # every answer 500 is retried by this layer, and counted
        assert paths.RETRIES["s3"] == proxy.failed
    elif mode == "short":  # a short body is caught by the length check and retried here
        assert 0 < paths.RETRIES["s3"] <= proxy.failed
    else:  # aiohttp itself re-sends a request whose keep-alive connection dropped, so fewer reach this layer
        assert paths.RETRIES["s3"] <= proxy.failed
    assert paths.listdir(root) == sorted(os.path.basename(p) for p in blobs)


def _hub_cache(home: str, repo: str, files: dict[str, str]) -> None:
    """The hub cache layout huggingface_hub writes: blobs, a snapshot of symlinks, refs/main naming the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = os.path.join(home, "hub", "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    for i, (name, text) in enumerate(files.items()):
        blob = os.path.join(base, "blobs", f"{i:040x}")
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "w") as f:
            f.write(text)
        link = os.path.join(base, "snapshots", commit, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)


def test_hf_paths_resolve_through_the_hub_cache_offline(tmp_path):
    home = str(tmp_path / "hf")
    _hub_cache(home, "tiny-org/tiny-model", {"config.json": '{"a": 1}', "tokenizer/vocab.txt": "x\ny\n"})
    script = (
        "from vla_foundry_jax import paths\n"
        "print(paths.read_text('hf://tiny-org/tiny-model/config.json'))\n"
        "import os; d = paths.local_dir('hf://tiny-org/tiny-model/tokenizer'); print(sorted(os.listdir(d)))\n"
        "print(paths.exists('hf://tiny-org/tiny-model/config.json'), paths.exists('hf://tiny-org/tiny-model/nope'))\n"
        "try:\n    paths.read_text('hf://tiny-org/other/config.json')\n"
        "except paths.PathError as e:\n    print('ERR', e)\n"
    )
    env = subprocess_env({"HF_HOME": home, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT})
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == '{"a": 1}'
    assert lines[1] == "['vocab.txt']"
    assert lines[2] == "True False"
    assert lines[3].startswith("ERR 'hf://tiny-org/other/config.json': cannot read from the hub")
    assert "HF_HOME" in lines[3]


def test_hf_is_read_only():
    with pytest.raises(paths.PathError, match="read-only"):
        paths.write_text("hf://org/repo/x.txt", "x")
    with pytest.raises(paths.PathError, match=r"experiment.output_dir.*read-only"):
        paths.check_writable("hf://org/repo", "experiment.output_dir")
