"""Self-contained policy runs, ``serving.Policy`` and the websocket policy server with its thin client.

One reach policy is trained briefly (``launch.train`` on vla_quickstart.gin, shrunk) on a generated dataset and a
copied processor; both are deleted and the run is moved before anything loads it, so every test here also checks
that the run holds everything inference reads.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from tests.fixtures.multidevice import last_json, run, start
from tests.fixtures.paths import PROCESSOR
from tests.fixtures.runs import train_command
from vla_foundry_jax.testbeds.tiny_robotics import (
    ACTION_FIELD,
    CAMERA,
    PROPRIO_FIELD,
    ReachEnv,
    make_sample,
    make_tiny_robotics_datasets,
)

N_EPISODES, EXECUTE = 4, 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A briefly trained reach policy, moved away from its training directory, dataset and processor deleted."""
    tmp = tmp_path_factory.mktemp("serving")
    data, proc = tmp / "dataset", tmp / "processor"
    make_tiny_robotics_datasets(str(data), num_train=32, num_val=8, samples_per_shard=16)
    shutil.copytree(PROCESSOR, proc)
    reach = data / "reach"
    bindings = [
        f"robotics.dataset_manifest = ['{reach}/train/manifest.jsonl']",
        f"robotics.val_dataset_manifest = ['{reach}/val/manifest.jsonl']",
        f"robotics.dataset_statistics = ['{reach}/train/stats.json']",
        f"robotics.processor = '{proc}'",
        f"experiment.output_dir = '{tmp / 'trained'}'",
        "experiment.total_train_samples = 24",
        "experiment.num_checkpoints = 1",
        "hparams.global_batch_size = 8",
        "hparams.per_gpu_batch_size = 8",
        "hparams.warmup = '1'",
        "vit_backbone.n_layers = 1",
        "transformer.n_layers = 1",
    ]
    run(train_command("vla_quickstart.gin", bindings))
    moved = tmp / "elsewhere" / "policy_run"
    shutil.copytree(tmp / "trained", moved)
    for path in (data, proc, tmp / "trained"):
        shutil.rmtree(path)
    return str(moved)


@pytest.fixture(scope="module")
def policy(run_dir):
    from vla_foundry_jax.serving import Policy

    return Policy.from_run(run_dir, num_flow_steps=4, batch_sizes=(1, 16))


def robot_obs(obs):
    return {
        "images": {CAMERA: obs["image"]},
        "proprio": {PROPRIO_FIELD: obs["agent_xy"]},
        "instruction": obs["instruction"],
    }


def test_run_holds_its_data_and_loads_without_the_dataset(run_dir):
    from vla_foundry_jax.sampling import load_run_model

    files = sorted(os.listdir(os.path.join(run_dir, "data")))
    assert files == ["preprocessing_config.yaml", "processor", "stats.json"]
    model, exp, _ = load_run_model(run_dir)
    assert list(exp.data.dataset_statistics) == [os.path.join(run_dir, "data", "stats.json")]
    assert exp.data.processor == os.path.join(run_dir, "data", "processor") and model.action_dim == 2
    cmd = [sys.executable, "-m", "launch.eval_policy", f"--run_dir={run_dir}", "--num_episodes=2"]
    summary = last_json(run([*cmd, "--num_inference_steps=2", "--max_steps=4"]))
    assert summary["num_episodes"] == 2 and "plot" not in summary  # no validation data left to plot


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread affinity is Linux")
def test_the_policy_pins_the_cpu_workers_one_per_core(policy):
    from vla_foundry_jax.cpu_threads import xla_cpu_worker_threads

    pinned = policy.pinned_cpu_threads
    assert pinned and set(pinned) == set(xla_cpu_worker_threads())
    assert all(os.sched_getaffinity(tid) == {core} for tid, core in pinned.items())
    assert len(set(pinned.values())) == len(pinned)


def test_policy_input_is_the_training_sample(policy):
    """The model input a session builds from robot observations equals the training transform of the same step
    written in the dataset's layout (previous position and command as the past row)."""
    env = ReachEnv()
    obs0 = env.reset(seed=5)
    session = policy.new_session(seed=1)
    r0 = policy.step(session, robot_obs(obs0))
    obs1, _, _ = env.step(r0.action[ACTION_FIELD])
    session.push(policy.check(robot_obs(obs1)))
    row = policy._row(session)

    agent = np.stack([obs0["agent_xy"]] + [obs1["agent_xy"]] * 8)
    action = np.stack([r0.action[ACTION_FIELD].astype(np.float64)] + [obs1["agent_xy"]] * 8)
    past, future = np.arange(9) < 1, np.arange(9) >= 1
    colour = obs1["instruction"].split()[-2]
    sample = make_sample("k", obs1["image"], agent, action, past, future, colour)
    want = policy.transform(sample, np.random.default_rng(0))
    for key in ("input_ids", "attention_mask", "pixel_values", "proprioception", "past_mask"):
        np.testing.assert_allclose(row[key], want[key], atol=1e-5, err_msg=key)
    np.testing.assert_allclose(row["actions"][0], want["actions"][0], atol=1e-5)
    # a camera image of another size is resized to the dataset's 32 x 32 first
    big = dict(robot_obs(obs1), images={CAMERA: np.repeat(np.repeat(obs1["image"], 2, 0), 2, 1)})
    assert policy.check(big)["images"][CAMERA].shape == (32, 32, 3)


def test_sessions_sample_the_same_in_any_batch(policy):
    env = ReachEnv()
    obs = [robot_obs(env.reset(seed=s)) for s in range(5)]
    alone = [policy.step(policy.new_session(seed=s), o).chunk[ACTION_FIELD] for s, o in enumerate(obs)]
    together = policy.step_batch([policy.new_session(seed=s) for s in range(5)], obs)  # padded to 16
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a, b.chunk[ACTION_FIELD], atol=1e-5)
    assert not np.allclose(alone[0], alone[1])


def test_ddpm_policy_and_flow_steps(policy):
    """A DDPM policy of the same layout (random weights) samples through the same Policy, batch-independent."""
    from flax import nnx

    from vla_foundry_jax.models import build_model
    from vla_foundry_jax.serving import Policy

    exp = policy.exp.replace(model=policy.exp.model.replace(use_flow_matching_scheduler=False))
    model = build_model(exp.model, rngs=nnx.Rngs(0), load_weights=False)
    assert model.scheduler.is_ddpm
    ddpm = Policy(model, exp, policy.transform, None, num_flow_steps=5, batch_sizes=(4,))
    env = ReachEnv()
    obs = [robot_obs(env.reset(seed=s)) for s in range(3)]
    alone = ddpm.step(ddpm.new_session(seed=2), obs[2]).chunk[ACTION_FIELD]
    batch = ddpm.step_batch([ddpm.new_session(seed=s) for s in range(3)], obs)
    np.testing.assert_allclose(alone, batch[2].chunk[ACTION_FIELD], atol=1e-5)
    assert np.isfinite(alone).all() and alone.shape == (8, 2)


@pytest.mark.parametrize("spec, dims", [("action_xy:agent_xy", [0, 1]), ("action_xy:agent_xy:0", [0])])
def test_relative_actions_come_back_absolute(policy, tmp_path, spec, dims):
    """A policy trained on ``action_xy_relative`` (the conversion's ``relative_actions`` spec in the preprocessing
    config) returns ``action_xy``: the sampled chunk plus the current state on the spec's dims. With the relative
    field's statistics equal to the absolute one's, the first step's model input is the same for both policies."""
    import json

    from vla_foundry_jax.data.robotics import robotics_transform
    from vla_foundry_jax.serving import Policy

    stats_path = policy.exp.data.dataset_statistics[0]
    with open(stats_path) as f:
        stats = json.load(f)
    stats["action_xy_relative"] = stats[ACTION_FIELD]
    with open(tmp_path / "stats.json", "w") as f:
        json.dump(stats, f)
    data = policy.exp.data.replace(
        dataset_statistics=[str(tmp_path / "stats.json")], action_fields=["action_xy_relative"]
    )
    rel = Policy(
        policy.model,
        policy.exp.replace(data=data),
        robotics_transform(data, train=False),
        {"relative_actions": [spec]},
        num_flow_steps=4,
    )
    assert rel.metadata()["action_fields"] == {ACTION_FIELD: 2}
    env = ReachEnv()
    obs = robot_obs(env.reset(seed=2))
    got = rel.step(rel.new_session(seed=3), obs).chunk[ACTION_FIELD]
    ref = policy.step(policy.new_session(seed=3), obs).chunk[ACTION_FIELD].copy()
    ref[:, dims] += obs["proprio"][PROPRIO_FIELD][dims]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # the past row the next step feeds back is the executed command relative to the state then
    s = rel.new_session(seed=3)
    first = rel.step(s, obs).action[ACTION_FIELD]
    nxt, _, _ = env.step(first)
    s.push(rel.check(robot_obs(nxt)))
    past = rel.normalizer.denormalize("action_xy_relative", rel._row(s)["actions"])[0]
    want = first.astype(np.float64)
    want[dims] -= nxt["agent_xy"][dims]
    np.testing.assert_allclose(past, want, atol=1e-5)


def test_receding_horizon_and_temporal_ensembling(policy):
    from vla_foundry_jax.errors import UsageError
    from vla_foundry_jax.serving import Execution

    s = policy.new_session(0, Execution("receding", execute_steps=3))
    chunks = [np.full((8, 2), float(i)) for i in range(3)]
    plans = 0
    executed = []
    for _ in range(7):
        if s.needs_plan():
            s.add_chunk(chunks[plans] + np.arange(8)[:, None] / 10)
            plans += 1
        executed.append(s.next_action()[0])
    assert plans == 3  # steps 0, 3, 6
    np.testing.assert_allclose(executed, [0, 0.1, 0.2, 1, 1.1, 1.2, 2])

    m = 0.5
    e = policy.new_session(0, Execution("ensemble", ensemble_decay=m))
    got = []
    for t in range(3):
        assert e.needs_plan()
        e.add_chunk(np.full((8, 2), 10.0 * t) + np.arange(8)[:, None])
        got.append(e.next_action()[0])
    # step 2 sees chunk 0 (index 2, value 2), chunk 1 (index 1, 11), chunk 2 (index 0, 20); ACT weights, oldest first
    w = np.exp(-m * np.arange(3))
    np.testing.assert_allclose(got[2], (w * [2, 11, 20]).sum() / w.sum())
    np.testing.assert_allclose(got[0], 0.0)
    with pytest.raises(UsageError, match="execute_steps"):
        policy.new_session(0, Execution("receding", execute_steps=9))


@pytest.fixture(scope="module")
def server(policy):
    from vla_foundry_jax.serving.server import PolicyServer, ServerThread

    srv = PolicyServer(policy, batch_window_ms=2.0)
    with ServerThread(srv) as url:
        yield srv, url


def test_robot_loop_through_the_server_matches_eval(policy, server):
    """examples/reach_client.py through the server reaches the same outcome as launch.eval_policy's rollout."""
    from examples.reach_client import run_episodes
    from vla_foundry_jax.apps.policy_eval import policy_actor, rollout
    from vla_foundry_jax_client import PolicyClient

    ref = rollout(
        policy_actor(policy, num_episodes=N_EPISODES, seed=7, execute_steps=EXECUTE),
        num_episodes=N_EPISODES,
        seed=7,
        max_steps=10,
    )
    with PolicyClient(server[1]) as client:
        meta = client.metadata
        got = run_episodes(client, num_episodes=N_EPISODES, seed=7, execute_steps=EXECUTE, max_steps=10)
    assert meta["cameras"] == [CAMERA] and meta["action_fields"] == {ACTION_FIELD: 2} and meta["action_horizon"] == 8
    assert meta["proprio_fields"] == {PROPRIO_FIELD: 2} and meta["schema_version"] == 1
    assert got["successes"] == ref["successes"] and got["steps"] == ref["steps"]
    assert got["success_rate"] == ref["success_rate"]


def _bad_requests(good):
    """(request, field the error must name) pairs."""
    obs = good["observation"]
    img = obs["images"][CAMERA]
    with_image = lambda im: {**good, "observation": {**obs, "images": {CAMERA: im}}}  # noqa: E731
    with_proprio = lambda v: {**good, "observation": {**obs, "proprio": {PROPRIO_FIELD: v}}}  # noqa: E731
    return [
        ({**good, "observation": {**obs, "images": {"wrist": img}}}, f"images.{CAMERA}"),
        (with_image(img[..., :2]), f"images.{CAMERA}"),
        (with_image(img.astype(np.float32)), f"images.{CAMERA}"),
        (with_proprio(np.zeros(3)), f"proprio.{PROPRIO_FIELD}"),
        (with_proprio(np.array([np.nan, 0.0])), f"proprio.{PROPRIO_FIELD}"),
        ({**good, "schema_version": 99}, "schema_version"),
        ({**good, "type": "fly"}, "type"),
        ({"type": "infer", "schema_version": 1}, "observation"),
        ({**good, "observation": {**obs, "instruction": 3}}, "instruction"),
    ]


def test_bad_input_gets_an_error_and_the_connection_stays(server):
    from vla_foundry_jax_client import PolicyClient, ServerError, pack

    env = ReachEnv()
    good = {"type": "infer", "observation": robot_obs(env.reset(seed=0))}
    with PolicyClient(server[1]) as client:
        for request, field in _bad_requests(good):
            message = {"schema_version": 1, **request}
            client._ws.send(pack(message))
            from vla_foundry_jax_client import unpack

            reply = unpack(client._ws.recv())
            assert reply["type"] == "error" and reply["field"] == field, (field, reply)
            assert "expected" in reply["message"] or "unknown" in reply["message"] or "missing" in reply["message"]
        for frame in (b"\xc1\xff garbage", "text frame", pack([1, 2])):
            client._ws.send(frame)
            assert unpack(client._ws.recv())["field"] == "message"
        with pytest.raises(ServerError) as err:
            client.reset(seed=0, execute_steps=99)
        assert err.value.field == "execution"
        client.reset(seed=0)
        assert client.infer(good["observation"])[ACTION_FIELD].shape == (2,)
        assert client.last["step"] == 0  # the rejected requests left the session's history alone


def test_load_with_malformed_requests_and_disconnects(server):
    """16 clients x 200 requests, every 7th malformed: every valid one answered, errors for the rest, no state
    left after the clients go (one of them mid-request), fewer device calls than requests."""
    from vla_foundry_jax_client import PolicyClient, pack, unpack

    srv, url = server
    env = ReachEnv()
    good_obs = robot_obs(env.reset(seed=0))
    calls_before = srv.device_calls
    failures: list[str] = []

    def client_loop(c: int) -> None:
        try:
            with PolicyClient(url) as client:
                client.reset(seed=c)
                bad = _bad_requests({"type": "infer", "observation": good_obs})
                for i in range(200):
                    if i % 7 == 3:
                        request, field = bad[(c + i) % len(bad)]
                        client._ws.send(pack({"schema_version": 1, "id": i, **request}))
                        reply = unpack(client._ws.recv())
                        if reply.get("type") != "error" or reply.get("field") != field:
                            failures.append(f"client {c} request {i}: {reply}")
                    else:
                        action = client.infer(good_obs)
                        if client.last["id"] is None or action[ACTION_FIELD].shape != (2,):
                            failures.append(f"client {c} request {i}: {client.last}")
        except Exception as e:
            failures.append(f"client {c}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    # a client that leaves mid-request
    quitter = PolicyClient(url)
    quitter._ws.send(pack({"schema_version": 1, "type": "infer", "observation": good_obs}))
    quitter.close()
    for t in threads:
        t.join(300)
    assert not failures, failures[:5]
    valid = 16 * sum(1 for i in range(200) if i % 7 != 3)
    calls = srv.device_calls - calls_before
    assert calls < valid / 2, (calls, valid)  # requests of concurrent clients share device calls
    import time

    for _ in range(100):
        if not srv.sessions:
            break
        time.sleep(0.05)
    assert srv.sessions == {}
    with PolicyClient(url) as client:  # the server is still up
        assert client.infer(good_obs)[ACTION_FIELD].shape == (2,)


def test_client_imports_without_jax():
    code = (
        "import sys, vla_foundry_jax_client\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'vla_foundry_jax')]\n"
        "assert not heavy, heavy"
    )
    run([sys.executable, "-c", code])


def test_serve_policy_cli(run_dir):
    from vla_foundry_jax_client import PolicyClient

    bad = run([sys.executable, "-m", "launch.serve_policy", "--run_dir=/nonexistent/run", "--port=0"], check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    proc = start([sys.executable, "-m", "launch.serve_policy", f"--run_dir={run_dir}", "--port=0", "--max_batch=1"])
    try:
        line = ""
        while "serving" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()[-3000:]
        url = line.split(" on ")[1].split()[0]
        with PolicyClient(url) as client:
            assert client.metadata["batch_sizes"] == [1]
            obs = robot_obs(ReachEnv().reset(seed=0))
            assert np.isfinite(client.infer(obs)[ACTION_FIELD]).all()
    finally:
        proc.send_signal(signal.SIGTERM)  # as a process manager stops it (Ctrl-C: KeyboardInterrupt, also exit 0)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
