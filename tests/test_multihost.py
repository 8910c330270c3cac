"""Two `btoks train` processes on CPU, joined by `jax.distributed` over loopback, reproduce the one-process run.

The two-process run has 2 forced CPU devices per process (a 4-device global mesh); the reference is one process
with 4 devices, so the mesh, the global batch and the math are the same and only the collectives differ (gloo
across processes). Each process reads only its half of every global batch (`TrainBatchIterator` slices by
`process_index`; `test_data.py` checks that the halves concatenate to the whole), so equal losses also show that
`make_array_from_process_local_data` put the halves together in order. Checked besides: process 0 alone writes
metrics, TensorBoard events and log lines, the evaluation hook agrees, and both processes wrote their share of
one complete Orbax checkpoint that restores to the reference parameters.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from btoks_jax import checkpoint
from btoks_jax.data.emoji_dataset import build_emoji_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
BATCH = 8
DEVICES = 4  # global; the two-process run has DEVICES // 2 per process
DEADLINE_S = 420  # all three processes together; about 2 minutes on an idle 2-core machine
TIMING_KEYS = ("steps_per_s", "tokens_per_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir, data_dir, *overrides) -> list[str]:
    config = os.path.join(ROOT, "configs", "tiny_cpu.py") + f":runlocal,steps={STEPS},batch={BATCH},data_dir={data_dir}"
    # data.prepare off: the test built a small data set, which the trainer's default build would replace.
    return [sys.executable, "-m", "btoks_jax.cli", "train", "--config", config, "--workdir", str(workdir),
            "--config.data.prepare=", "--config.progress=False", *overrides]


def _env(local_devices: int, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               # A process that hangs or aborts (the coordinator ends both when one is stuck) prints where.
               PYTHONFAULTHANDLER="1", **extra)
    return env


def _tail(path, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def _run_all(runs: dict[str, tuple[list[str], dict[str, str]]], logs) -> None:
    """Starts every run at once and waits for all; any failure or the deadline kills the rest."""
    procs, files = {}, {}
    try:
        for name, (cmd, env) in runs.items():
            files[name] = open(logs / f"{name}.log", "w")
            procs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=files[name],
                                           stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + DEADLINE_S
        failed = None
        while time.monotonic() < deadline:
            codes = {name: p.poll() for name, p in procs.items()}
            failed = next((name for name, rc in codes.items() if rc not in (None, 0)), None)
            if failed or all(rc == 0 for rc in codes.values()):
                break
            time.sleep(0.5)
        if failed or any(p.poll() is None for p in procs.values()):
            why = f"{failed} exited with {procs[failed].returncode}" if failed else f"deadline of {DEADLINE_S}s passed"
            _dump_stacks(procs)
            _kill(procs)
            report = "\n".join(f"----- {name} (exit {p.returncode}):\n{_tail(logs / f'{name}.log', 8000)}"
                               for name, p in procs.items())
            pytest.fail(f"{why}\n{report}")
    finally:
        _kill(procs)
        for f in files.values():
            f.close()


def _dump_stacks(procs, wait_s: float = 10.0) -> None:
    """SIGABRT to the processes still running: faulthandler (PYTHONFAULTHANDLER) prints every thread's stack
    into their logs before they die, so a report shows where a process was stuck."""
    running = [p for p in procs.values() if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGABRT)
    deadline = time.monotonic() + wait_s
    while any(p.poll() is None for p in running) and time.monotonic() < deadline:
        time.sleep(0.2)


def _kill(procs) -> None:
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # its own session: the group is this run alone
        p.wait()


def _metrics(workdir) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "eval" not in r], [r for r in rows if "eval" in r]


def _restore_numpy(step_dir) -> dict:
    """A checkpoint's `state` item as NumPy arrays, independent of the mesh that wrote it."""
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(os.path.join(step_dir, "state")).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(os.path.join(step_dir, "state"), restore_args=args)


@pytest.mark.slow
@pytest.mark.xdist_group("multihost")
def test_two_processes_on_loopback_match_one_process(tmp_path):
    data = tmp_path / "data"
    build_emoji_dataset(data, max_concepts=40)
    single, multi = tmp_path / "single", tmp_path / "multi"
    port = _free_port()
    address = f"127.0.0.1:{port}"

    def worker(i: int):
        flags = ["--config.distributed.enabled=True", f"--config.distributed.coordinator_address={address}",
                 "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
        # The coordinator service listens on every interface unless told otherwise; loopback is enough here.
        return _cmd(multi, data, *flags), _env(DEVICES // 2, JAX_COORDINATOR_BIND_ADDRESS=address)

    _run_all({"single": (_cmd(single, data), _env(DEVICES)), "process0": worker(0), "process1": worker(1)},
             tmp_path)
    log0, log1 = _tail(tmp_path / "process0.log", 10**7), _tail(tmp_path / "process1.log", 10**7)

    # Process 0 alone logs, and sees the global mesh.
    assert f"over {DEVICES} devices (2 processes)" in log0, log0[-3000:]
    assert "btoks.train" not in log1, log1[-3000:]

    # One metrics row per step and one TensorBoard file: process 1 wrote none of its own.
    (train_1p, eval_1p), (train_2p, eval_2p) = _metrics(single), _metrics(multi)
    assert [r["step"] for r in train_2p] == list(range(1, STEPS + 1)), train_2p
    assert [r["step"] for r in train_1p] == list(range(1, STEPS + 1)), train_1p
    assert len(os.listdir(multi / "tensorboard")) == 1, os.listdir(multi / "tensorboard")

    # The same losses (and every other logged quantity) as one process with the same global batch.
    for one, two in zip(train_1p, train_2p):
        for key in one.keys() - set(TIMING_KEYS):
            assert two[key] == pytest.approx(one[key], rel=1e-5), (one["step"], key, one[key], two[key])
    # The evaluation hook runs on both processes, with the same scores; only process 0 records them.
    assert [r["eval"] for r in eval_2p] == ["emoji", "train_pairs"] and eval_2p == eval_1p, (eval_1p, eval_2p)

    # One complete checkpoint per save, each process writing its share of the arrays.
    mgr = checkpoint.manager(str(multi), read_only=True, async_save=False)
    assert mgr.latest_step() == STEPS and list(mgr.all_steps()) == [2, STEPS], list(mgr.all_steps())
    step_dir = multi / "checkpoints" / str(STEPS)
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(step_dir / "state")), os.listdir(step_dir / "state")
    assert checkpoint.read_meta(str(multi))[0] == STEPS
    data_states = []
    for run in (single, multi):
        with open(run / "checkpoints" / str(STEPS) / "data" / "metadata") as f:
            data_states.append(json.load(f))
    assert data_states[0] == data_states[1] and data_states[1]["step"] == STEPS, data_states
    got, want = _restore_numpy(step_dir), _restore_numpy(single / "checkpoints" / str(STEPS))
    assert int(got["step"]) == STEPS
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got["params"]))
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want["params"]))
    assert flat_got.keys() == flat_want.keys()
    for path, value in flat_want.items():
        # atol: the attention key biases get no true gradient (softmax ignores a shift shared by all keys), so
        # Adam turns float noise in their gradients into steps; measured worst difference 2e-6 on values ~2e-3.
        np.testing.assert_allclose(flat_got[path], value, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
