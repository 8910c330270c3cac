"""A killed run resumes: SIGKILL between saves and SIGTERM both reproduce the uninterrupted losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import train_utils as U

from btoks_jax.data.emoji_dataset import build_emoji_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 7
# Waits on the trainer subprocesses only guard against hangs: a busy machine is many times slower than an idle one
# (a fixed 300 s once failed there), so the limit is generous and nothing else depends on wall-clock time.
HANG_S = 1800


def _cmd(workdir, data_dir):
    return [sys.executable, "-m", "btoks_jax.cli", "train",
            "--config", os.path.join(ROOT, "configs", "tiny_cpu.py") + f":runlocal,steps={STEPS},evals=0,"
            f"data_dir={data_dir}", "--workdir", str(workdir), "--config.checkpoint.every=2",
            "--config.progress=False", "--config.data.prepare="]


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def _losses(workdir) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for row in U.loss_rows(workdir):
        out.setdefault(row["step"], []).append(row["loss"])
    return out


def _run(workdir, data_dir, timeout=HANG_S):
    r = subprocess.run(_cmd(workdir, data_dir), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]


def _interrupt(workdir, data_dir, sig, at_step=3, timeout=HANG_S):
    """Starts a run and sends `sig` once step `at_step` is logged (between the saves at 2 and 4)."""
    proc = subprocess.Popen(_cmd(workdir, data_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"run ended before the signal: {proc.stderr.read()[-3000:]}")
            if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(_losses(workdir), default=0) >= at_step:
                proc.send_signal(sig)
                break
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached the step to interrupt")
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc


@pytest.mark.xdist_group("resume")
def test_killed_and_preempted_run_reproduces_uninterrupted_losses(tmp_path):
    """SIGKILL after step 3 (last save at 2), resume; SIGTERM after step 5 (saves there), resume to the end.
    Every logged loss, including steps logged twice around the kill, equals the uninterrupted run's."""
    data = tmp_path / "data"
    build_emoji_dataset(data, max_concepts=40)
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    _run(ref_dir, data)
    reference = {s: v[0] for s, v in _losses(ref_dir).items()}
    assert sorted(reference) == list(range(1, STEPS + 1))

    assert _interrupt(run_dir, data, signal.SIGKILL, at_step=3) == -signal.SIGKILL
    assert _interrupt(run_dir, data, signal.SIGTERM, at_step=5) == 0  # a clean stop after saving
    saved = sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())
    assert saved[-1] >= 5, saved  # the preemption save, beyond the periodic save at 4
    _run(run_dir, data)
    resumed = _losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert any(len(v) > 1 for v in resumed.values())  # the kill really lost work that was redone
    for step, values in resumed.items():
        for v in values:
            assert v == pytest.approx(reference[step], rel=1e-6, abs=1e-6), (step, v, reference[step])
