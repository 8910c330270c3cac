"""launch/: tpu.py's commands under --dry-run, its worker scripts and run loop (stand-in tools), and the TPU table."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
sys.path.insert(0, str(LAUNCH))  # tpu.py imports topologies the way it does when run as a script

import topologies  # noqa: E402
import tpu  # noqa: E402

PROJECT = "--project=btoks-test"
WORKDIR = "gs://btoks-bucket/runs/exp1"
CONFIG = "configs/qwen2vl_2b.py:data_root=/mnt/disks/data/mmeb_train"
WEIGHTS = "gs://btoks-bucket/models/Qwen2-VL-2B-Instruct"
TRAIN_FLAGS = [f"--config={CONFIG}", f"--workdir={WORKDIR}", "--config.total_steps=5000",
               "--config.optim.learning_rate=5e-5", f"--config.model.hf_dir={WEIGHTS}"]
# (accelerator type, workers, runtime version, default zone)
SLICES = [
    ("v5litepod-16", 4, "v2-alpha-tpuv5-lite", "us-west4-a"),
    ("v4-8", 1, "tpu-ubuntu2204-base", "us-central2-b"),
    ("v6e-16", 4, "v2-alpha-tpuv6e", "us-east5-b"),
]


def cli(capsys, *args: str) -> tuple[list[list[str]], list[str]]:
    """Runs tpu.py in-process; returns its commands (argv lists) and its notes, checking nothing else is printed."""
    assert tpu.main(list(args)) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(line.startswith(("+ ", "# ")) for line in out), out
    return [shlex.split(line[2:]) for line in out if line.startswith("+ ")], [
        line[2:] for line in out if line[0] == "#"
    ]


def cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        tpu.main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def flag(argv: list[str], name: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(name + "=")]
    assert len(values) <= 1, argv
    return values[0] if values else None


def script_of(argv: list[str]) -> str:
    """The remote script of a `gcloud compute tpus tpu-vm ssh` command."""
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
    return flag(argv, "--command")


# ----------------------------------------------------------------------------------------------------------------------
# Dry runs.


@pytest.mark.parametrize("accelerator_type, workers, runtime, zone", SLICES)
def test_create_queues_a_spot_slice_with_the_generation_defaults(capsys, accelerator_type, workers, runtime, zone):
    commands, notes = cli(capsys, "create", f"--accelerator-type={accelerator_type}", PROJECT, "--dry-run")
    [create] = commands
    name = f"btoks-{accelerator_type}"
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", name]
    assert flag(create, "--node-id") == name
    assert flag(create, "--accelerator-type") == accelerator_type
    assert flag(create, "--runtime-version") == runtime
    assert flag(create, "--zone") == zone
    assert flag(create, "--project") == "btoks-test"
    assert "--spot" in create
    hosts = "1 host" if workers == 1 else f"{workers} hosts"
    assert f"{accelerator_type}: {topologies.TOPOLOGIES[accelerator_type]['chips']} chips on {hosts}" in notes[0]
    if topologies.TOPOLOGIES[accelerator_type]["status"] == topologies.PROVISIONAL:
        assert "provisional until the ahead-of-time compile benchmark" in notes[0]
    else:  # confirmed by the committed benchmark results (launch/aot_compile_2b.json)
        assert "AOT compile: fits" in notes[0]


@pytest.mark.parametrize(
    "accelerator_type, provisioning, group, tier",
    [
        ("v6e-8", "reserved", ["gcloud", "compute", "tpus"], ["--reserved"]),
        ("v5p-8", "on-demand", ["gcloud", "compute", "tpus"], []),
        ("v4-8", "best-effort", ["gcloud", "alpha", "compute", "tpus"], ["--best-effort"]),
    ],
)
def test_create_provisioning_tiers(capsys, accelerator_type, provisioning, group, tier):
    (create,), _ = cli(
        capsys, "create", f"--accelerator-type={accelerator_type}", f"--provisioning={provisioning}", "--dry-run"
    )
    assert create[: len(group)] == group
    assert [arg for arg in create if arg in ("--spot", "--reserved", "--best-effort")] == tier
    assert flag(create, "--project") is None  # gcloud's configured project


def test_create_overrides_and_extra_flags(capsys):
    (create,), _ = cli(
        capsys,
        "create",
        "--accelerator-type=v5p-16",
        "--name=my-slice",
        "--zone=us-central1-a",
        "--runtime-version=v2-alpha-tpuv5-custom",
        "--create-arg=--network=my-net",
        "--dry-run",
    )
    assert create[5] == "my-slice" and flag(create, "--node-id") == "my-slice"
    assert flag(create, "--zone") == "us-central1-a"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5-custom"
    assert flag(create, "--network") == "my-net"


def test_setup_uploads_this_checkout_and_installs_the_tpu_extra_on_every_worker(capsys):
    (tar, scp, ssh), _ = cli(capsys, "setup", "--accelerator-type=v5litepod-16", PROJECT, "--dry-run")
    assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(LAUNCH.parent), "."]
    assert "--exclude=.git" in tar and "--exclude=.venv" in tar
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5] == tar[2] and scp[6] == f"btoks-v5litepod-16:{tpu.REMOTE_TARBALL}"
    assert flag(scp, "--worker") == "all" and flag(ssh, "--worker") == "all"
    script = script_of(ssh)
    assert f"tar -xzf {tpu.REMOTE_TARBALL}" in script
    assert "uv pip install --quiet --python btoks_venv/bin/python -e 'btoks_jax[tpu]'" in script
    assert 'find_spec("torch") is None' in script  # the install is checked to be torch-free
    assert "torch==" not in script and "install torch" not in script


def test_setup_from_a_git_repository(capsys):
    (ssh,), _ = cli(
        capsys, "setup", "--accelerator-type=v4-8", "--repo=https://example.com/btoks.git", "--ref=v0.1", "--dry-run"
    )
    script = script_of(ssh)
    assert "git clone --quiet https://example.com/btoks.git btoks_jax" in script
    assert "git -C btoks_jax checkout --quiet v0.1" in script
    assert flag(ssh, "--worker") == "all"


@pytest.mark.parametrize("accelerator_type, workers, check", [("v4-8", 1, False), ("v6e-16", 4, True)])
def test_setup_device_check_initializes_jax_distributed_on_multi_host(capsys, accelerator_type, workers, check):
    commands, _ = cli(capsys, "setup", f"--accelerator-type={accelerator_type}", "--check-devices", "--dry-run")
    script = script_of(commands[-1])
    assert flag(commands[-1], "--worker") == "all"
    assert ("jax.distributed.initialize()" in script) == check
    assert "jax.device_count()" in script


@pytest.mark.parametrize("accelerator_type, workers, runtime, zone", SLICES)
def test_train_starts_on_every_worker_in_the_background(capsys, accelerator_type, workers, runtime, zone):
    (ssh,), notes = cli(
        capsys, "train", f"--accelerator-type={accelerator_type}", PROJECT, *TRAIN_FLAGS, "--env=FOO=a b", "--dry-run"
    )
    assert flag(ssh, "--worker") == "all" and flag(ssh, "--zone") == zone
    script = script_of(ssh)
    assert "setsid nohup bash -c" in script and "< /dev/null &" in script
    assert f">> {tpu.REMOTE_LOG} 2>&1" in script
    job = shlex.join(["train", "--config", CONFIG, "--workdir", WORKDIR, *TRAIN_FLAGS[2:]])
    assert f'"$HOME/btoks_venv/bin/btoks" {job}; echo $?' in shlex.split(script.split("setsid nohup bash -c ")[1])[0]
    assert ("BTOKS_DISTRIBUTED=1" in script) == (workers > 1)
    assert "FOO='a b'" in script
    assert "use train --restart" in script  # refuses to start a second copy
    assert WORKDIR in notes[-1]


def test_train_restart_stops_the_running_job_first(capsys):
    (ssh,), _ = cli(capsys, "train", "--accelerator-type=v4-8", *TRAIN_FLAGS, "--restart", "--dry-run")
    assert 'kill -TERM -- "-$(cat btoks_train.pid)"' in script_of(ssh)


def test_run_dry_run_prints_the_preemption_retry_plan(capsys):
    commands, notes = cli(
        capsys, "run", "--accelerator-type=v5litepod-16", PROJECT, *TRAIN_FLAGS, "--max-preemptions=7", "--dry-run"
    )
    kinds = [" ".join(argv[3:5]) if argv[0] == "gcloud" else argv[0] for argv in commands]
    assert kinds == [
        "queued-resources describe",  # 1. exists?
        "queued-resources create",
        "queued-resources describe",  # 2. wait for ACTIVE
        "tpu-vm ssh",  # 3. already training?
        "tar",
        "tpu-vm scp",
        "tpu-vm ssh",  # install
        "tpu-vm ssh",  # 4. train
        "queued-resources describe",  # 5. watch
        "tpu-vm describe",
        "tpu-vm ssh",
        "queued-resources delete",  # 6. preempted: delete, then from 1. again
        "tpu-vm ssh",  # 7. restart training
        "queued-resources delete",  # 8. finished
    ]
    create = commands[1]
    assert "--spot" in create and flag(create, "--accelerator-type") == "v5litepod-16"
    trains = [script_of(commands[7]), script_of(commands[12])]
    assert trains[0] == trains[1] and all(f"--workdir {WORKDIR} " in script for script in trains)
    assert all(flag(argv, "--worker") == "all" for argv in commands if argv[3:5] == ["tpu-vm", "ssh"])
    assert "btoks-status" in script_of(commands[3]) and "btoks-status" in script_of(commands[10])
    plan = "\n".join(notes)
    assert "on preemption" in plan and "at most 7 times" in plan and "re-create it" in plan
    assert "the bucket and its checkpoints are kept" in plan
    assert all(argv[4] != "delete" or argv[-2:] == ["--force", "--quiet"] for argv in commands)


def test_run_keep_slice_does_not_delete_after_success(capsys):
    commands, _ = cli(capsys, "run", "--accelerator-type=v4-8", *TRAIN_FLAGS, "--keep-slice", "--dry-run")
    assert commands[-1][3:5] != ["queued-resources", "delete"]


@pytest.mark.parametrize(
    "extra, worker, follow, prefixed",
    [([], "0", True, False), (["--all-workers"], "all", True, True), (["--no-follow", "--lines=5"], "0", False, False)],
)
def test_logs(capsys, extra, worker, follow, prefixed):
    (ssh,), _ = cli(capsys, "logs", "--accelerator-type=v5litepod-16", *extra, "--dry-run")
    script = script_of(ssh)
    assert flag(ssh, "--worker") == worker
    assert script.startswith("tail -n ") and (" -F " in script) == follow
    assert ("$(hostname)" in script) == prefixed
    assert tpu.REMOTE_LOG in script


def test_logs_status_and_teardown_by_name_and_zone(capsys):
    for command in ("logs", "status", "teardown"):
        commands, _ = cli(capsys, command, "--name=my-slice", "--zone=europe-west4-a", "--dry-run")
        assert all(argv[5] == "my-slice" and flag(argv, "--zone") == "europe-west4-a" for argv in commands)


def test_status(capsys):
    (describe, probe, tail), _ = cli(capsys, "status", "--accelerator-type=v6e-16", PROJECT, "--dry-run")
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "btoks-v6e-16"]
    assert flag(probe, "--worker") == "all" and tpu.REMOTE_EXIT in script_of(probe)
    assert flag(tail, "--worker") == "0" and script_of(tail).startswith("tail -n 20 ")


@pytest.mark.parametrize("accelerator_type", [s[0] for s in SLICES])
def test_teardown_deletes_the_queued_resource_and_never_the_bucket(capsys, accelerator_type):
    (delete,), notes = cli(capsys, "teardown", f"--accelerator-type={accelerator_type}", PROJECT, "--dry-run")
    name = f"btoks-{accelerator_type}"
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", name]
    assert delete[-2:] == ["--force", "--quiet"]  # --force: the TPU node goes with it
    assert not any(word in " ".join(delete) for word in ("gs://", "storage", "gsutil", "bucket"))
    assert "bucket and its checkpoints are kept" in notes[-1]


# Every subcommand, run as a script: --dry-run prints commands only, and runs none (no gcloud on PATH here).
@pytest.mark.parametrize(
    "args",
    [
        ["create", "--accelerator-type=v5litepod-16"],
        ["setup", "--accelerator-type=v5litepod-16"],
        ["train", "--accelerator-type=v5litepod-16", *TRAIN_FLAGS],
        ["logs", "--accelerator-type=v5litepod-16"],
        ["status", "--accelerator-type=v5litepod-16"],
        ["teardown", "--accelerator-type=v5litepod-16"],
        ["run", "--accelerator-type=v5litepod-16", *TRAIN_FLAGS],
    ],
    ids=lambda args: args[0],
)
def test_every_subcommand_dry_runs_as_a_script_without_gcloud(tmp_path, args):
    env = dict(os.environ, PATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(LAUNCH / "tpu.py"), *args, "--dry-run"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith(("+ ", "# ")) for line in lines)
    assert any(line.startswith("+ gcloud ") for line in lines)


# The placeholders of the documentation, and values that pass the launcher's checks.
PLACEHOLDERS = {"MY_PROJECT": "my-project", "MY_BUCKET": "my-bucket", " --config.KEY=VALUE": ""}


def documented_commands() -> list[list[str]]:
    """Every `python launch/tpu.py ...` command of launch/README.md and of tpu.py's docstring (continuation lines
    joined, trailing comments dropped, placeholders filled in)."""
    commands = []
    for text in ((LAUNCH / "README.md").read_text(), tpu.__doc__):
        for line in text.replace("\\\n", " ").splitlines():
            _, found, command = line.partition("python launch/tpu.py ")
            if found and not command.startswith("logs --name={"):
                command = command.split(" #")[0].split("`")[0]
                for placeholder, value in PLACEHOLDERS.items():
                    command = command.replace(placeholder, value)
                commands.append(shlex.split(command))
    return commands


def load_config(spec: str):
    """configs/NAME.py[:ARG] as `btoks train --config` loads it."""
    import importlib.util

    file, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("launch_config", LAUNCH.parent / file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def test_documented_commands_run_and_their_configs_load(capsys):
    commands = documented_commands()
    assert {argv[0] for argv in commands} >= {"run", "create", "setup", "train", "logs", "status", "teardown"}
    configs = set()
    for argv in commands:
        cli(capsys, *argv, *([] if "--dry-run" in argv else ["--dry-run"]))
        config = flag(argv, "--config")
        if config is None:
            continue
        configs.add(config.split(":")[0])
        loaded = load_config(config)
        for override in (arg for arg in argv if arg.startswith("--config.")):
            key, _, value = override[len("--config."):].partition("=")
            node = loaded
            for part in key.split("."):
                assert part in node, f"{override}: {config} has no {key}"
                node = node[part]
            if key == "model.hf_dir":
                assert value.startswith("gs://"), override  # the workers read the weights from the bucket
    assert configs == {"configs/qwen2vl_2b.py", "configs/qwen2vl_2b_v2.py"}
    assert load_config("configs/tiny_cpu.py:runlocal").total_steps == 4  # the smoke test the README names


def test_the_weights_directory_reaches_every_worker(capsys):
    (ssh,), notes = cli(capsys, "train", "--accelerator-type=v6e-16", *TRAIN_FLAGS, "--dry-run")
    assert f"--config.model.hf_dir={WEIGHTS}" in shlex.split(script_of(ssh).split("setsid nohup bash -c ")[1])[0]
    assert not [note for note in notes if "weights from" in note]
    local = [*TRAIN_FLAGS[:-1], "--config.model.hf_dir=/models/Qwen2-VL-2B-Instruct"]
    _, notes = cli(capsys, "run", "--accelerator-type=v6e-16", *local, "--dry-run")
    assert "weights from /models/Qwen2-VL-2B-Instruct: a path on the workers, which every worker must have" in notes[1]


def test_missing_gcloud_is_a_clear_error(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(LAUNCH / "tpu.py"), "teardown", "--accelerator-type=v4-8"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "gcloud (the Google Cloud CLI) is not on PATH" in proc.stderr and "--dry-run" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, named",
    [
        (["create", "--accelerator-type=v5e-16"], "--accelerator-type: unknown TPU type 'v5e-16' (did you mean v5l"),
        (["create", "--accelerator-type=v9-8"], "--accelerator-type: unknown TPU type"),
        (["create"], "--accelerator-type: required for create"),
        (["create", "--accelerator-type=v4-8", "--zone=uscentral2"], "--zone:"),
        (["create", "--accelerator-type=v4-8", "--name=Bad_Name"], "--name:"),
        (["create", "--accelerator-type=v4-8", "--project=X"], "--project:"),
        (["create", "--accelerator-type=v6e-8", "--provisioning=best-effort"], "--provisioning:"),
        (["create", "--accelerator-type=v4-8", "--create-arg=network"], "--create-arg:"),
        (["create", "--accelerator-type=v4-8", "--config.lr=1"], "--config.lr: config overrides go to train or run"),
        (["train", "--accelerator-type=v4-8", "--workdir=gs://b1/x"], "--config: required"),
        (["train", "--accelerator-type=v4-8", "--config=c.py"], "--workdir: required"),
        (["train", "--accelerator-type=v4-8", "--config=c.py", "--workdir=runs/x"], "--workdir: 'runs/x' must be a"),
        (["train", "--accelerator-type=v4-8", "--config=c.py", "--workdir=/b/x"], "--workdir:"),
        (["train", "--accelerator-type=v4-8", "--config=c.py", "--workdir=gs://Bad_Bucket/x"], "--workdir:"),
        (["train", "--accelerator-type=v4-8", "--config=c.py", "--workdir=gs://bucket"], "--workdir: give a folder"),
        (["train", "--accelerator-type=v4-8", "--config=configs/btoks_2b.py", f"--workdir={WORKDIR}"],
         "--config: configs/btoks_2b.py is not a file of"),
        (["run", "--accelerator-type=v4-8", "--config=configs/nope.py:data_root=x", f"--workdir={WORKDIR}"],
         "configs there: configs/qwen2vl_2b.py, configs/qwen2vl_2b_v2.py, configs/tiny_cpu.py"),
        (["train", "--accelerator-type=v4-8", *TRAIN_FLAGS, "--env=NOVALUE"], "--env:"),
        (["train", "--accelerator-type=v4-8", *TRAIN_FLAGS, "--config.lr"], "--config.lr: config overrides take"),
        (["run", "--accelerator-type=v4-8", *TRAIN_FLAGS, "--max-restarts=-1"], "--max-restarts:"),
        (["setup", "--accelerator-type=v4-8", "--python=python3"], "--python:"),
        (["setup", "--name=x", "--zone=us-east5-b", "--check-devices"], "--check-devices:"),
        (["logs"], "--name: required"),
        (["status", "--name=my-slice"], "--zone: required"),
        (["logs", "--accelerator-type=v4-8", "--lines=-1"], "--lines:"),
    ],
)
def test_bad_inputs_exit_2_naming_the_flag(capsys, args, named):
    assert named in cli_error(capsys, *args, "--dry-run")


def test_source_must_be_a_checkout(capsys, tmp_path):
    assert "--source:" in cli_error(capsys, "setup", "--accelerator-type=v4-8", f"--source={tmp_path}", "--dry-run")


# ----------------------------------------------------------------------------------------------------------------------
# The worker-side scripts, run by bash here with stand-ins for btoks, git and uv.


def bash(script: str, home: Path, path: str = os.environ["PATH"], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script],
        check=False,
        env={**os.environ, "HOME": str(home), "PATH": path, **env},
        capture_output=True,
        text=True,
    )


def stand_in(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def wait_for(home: Path, expected: str) -> str:
    for _ in range(100):
        status = tpu.training_status(bash(tpu.PROBE_SCRIPT, home).stdout, workers=1)
        if status.startswith(expected):
            return status
        time.sleep(0.05)
    raise AssertionError(f"worker never reported {expected!r}, last: {status!r}")


def test_worker_train_script_starts_refuses_restarts_and_reports(tmp_path):
    home = tmp_path
    (home / "btoks_jax").mkdir()
    # The stand-in btoks records what it got and then sleeps/exits as told.
    stand_in(
        home / "btoks_venv/bin/btoks",
        'echo "argv: $*"; echo "env: ${BTOKS_DISTRIBUTED:-unset} ${FOO:-unset} $(basename "$PWD")"; '
        'sleep "${SLEEP:-0}"; exit "${CODE:-0}"',
    )
    start = tpu.train_script("configs/c.py", WORKDIR, ["--config.x=a b"], ["FOO=1 2"], multihost=True, restart=False)
    restart = tpu.train_script("configs/c.py", WORKDIR, [], [], multihost=False, restart=True)
    assert bash(tpu.PROBE_SCRIPT, home).stdout.startswith("btoks-status: ")
    assert tpu.training_status(bash(tpu.PROBE_SCRIPT, home).stdout, workers=1) == "not running"
    try:
        assert bash(start, home, SLEEP="30").returncode == 0
        assert wait_for(home, "running ") in ("running 0", "running 1")
        second = bash(start, home)
        assert second.returncode == 1 and "training is already running" in second.stderr
        assert bash(restart, home, SLEEP="0", CODE="3").returncode == 0  # stops the sleeping job first
        assert wait_for(home, "exited") == "exited 3"
        assert bash(restart, home, CODE="0").returncode == 0
        assert wait_for(home, "exited") == "exited 0"
    finally:
        bash(f'kill -KILL -- "-$(cat {tpu.REMOTE_PID})" 2>/dev/null || true', home)
    log = (home / tpu.REMOTE_LOG).read_text()
    assert log.count("=== btoks train started") == 3
    assert f"argv: train --config configs/c.py --workdir {WORKDIR} --config.x=a b\n" in log
    assert "env: 1 1 2 btoks_jax\n" in log and "env: unset unset btoks_jax\n" in log


@pytest.mark.parametrize("from_git", [False, True])
def test_worker_setup_script(tmp_path, monkeypatch, capsys, from_git):
    home, bin_dir, source = tmp_path / "home", tmp_path / "bin", tmp_path / "src"
    home.mkdir()
    for path in ("pyproject.toml", "btoks_jax/__init__.py", ".git/HEAD", "btoks_jax/__pycache__/x.pyc", "runs/a"):
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text("x")
    stand_in(bin_dir / "git", 'echo "git $*" >> "$HOME/calls"; if [ "$1" = clone ]; then mkdir -p "$4"; fi')
    venv_python = '#!/bin/sh\\necho "python $*" >> "$HOME/calls"\\n'
    stand_in(
        bin_dir / "uv",
        f'echo "uv $*" >> "$HOME/calls"; if [ "$1" = venv ]; then d="${{@: -1}}"; mkdir -p "$d/bin"; '
        f'printf \'{venv_python}\' > "$d/bin/python"; chmod +x "$d/bin/python"; fi',
    )
    if from_git:
        script = tpu.setup_script("https://example.com/btoks.git", "v0.1", "3.12")
    else:
        # The local half of setup: the printed tar command, run for real; scp is a copy.
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        (tar, _, ssh), _ = cli(capsys, "setup", "--accelerator-type=v4-8", f"--source={source}", "--dry-run")
        subprocess.run(tar, check=True)
        shutil.copy(tar[2], home / tpu.REMOTE_TARBALL)
        script = script_of(ssh)
    (home / "btoks_venv").mkdir()  # a stale venv from an earlier setup is replaced
    proc = bash(script, home, path=f"{bin_dir}:{os.environ['PATH']}")
    assert proc.returncode == 0, proc.stderr
    calls = (home / "calls").read_text().splitlines()
    if from_git:
        assert calls[:2] == [
            "git clone --quiet https://example.com/btoks.git btoks_jax",
            "git -C btoks_jax checkout --quiet v0.1",
        ]
    else:
        copied = sorted(str(p.relative_to(home / "btoks_jax")) for p in (home / "btoks_jax").rglob("*"))
        assert copied == ["btoks_jax", "btoks_jax/__init__.py", "pyproject.toml"]
        assert not (home / tpu.REMOTE_TARBALL).exists()
    assert calls[-3:-1] == [
        "uv venv --quiet --python 3.12 btoks_venv",
        "uv pip install --quiet --python btoks_venv/bin/python -e btoks_jax[tpu]",
    ]
    assert calls[-1].startswith("python -c import importlib.util, socket, jax; assert importlib.util.find_spec(")


@pytest.mark.parametrize(
    "script",
    [
        tpu.setup_script(None, "main", "3.12"),
        tpu.devices_script(True),
        tpu.train_script("c.py", WORKDIR, [], [], True, True),
        tpu.PROBE_SCRIPT,
        tpu.logs_script(10, True, True),
    ],
)
def test_worker_scripts_are_valid_bash(script):
    assert "\n" not in script  # one printed line per command
    proc = subprocess.run(["bash", "-n", "-c", script], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------------------------------------
# The run loop, against a stand-in gcloud that plays back queued-resource, node and training states.

FAKE_GCLOUD = """
import json, os, sys
state_path = os.environ["FAKE_GCLOUD_STATE"]
with open(state_path) as f:
    state = json.load(f)
args = sys.argv[1:]
with open(state["log"], "a") as f:
    f.write(json.dumps(args) + "\\n")
def next_of(key):
    value = state[key].pop(0) if len(state[key]) > 1 else state[key][0]
    with open(state_path, "w") as f:
        json.dump(state, f)
    return value
if args[2:4] == ["queued-resources", "describe"]:
    value = next_of("queued")
    if value == "NOT_FOUND":
        sys.exit(print("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found", file=sys.stderr))
    print(value)
elif args[2:4] == ["tpu-vm", "describe"]:
    print(next_of("node"))
elif args[2:4] == ["tpu-vm", "ssh"] and "btoks-status" in args[-1]:
    # One line per worker of the 4-host slice, among other output as gcloud prints it.
    print("SSH: Attempting to connect to worker 0...")
    status = next_of("probe")
    for worker, worker_status in enumerate(status if isinstance(status, list) else [status] * 4):
        print(f"btoks-status: t1v-n-{worker} {worker_status}")
"""


def run_loop(tmp_path: Path, states: dict, *flags: str) -> tuple[subprocess.CompletedProcess, list[str], list]:
    """Runs `tpu.py run` against the stand-in gcloud; returns the process, the kinds of gcloud calls, the calls."""
    bin_dir = tmp_path / "bin"
    (tmp_path / "gcloud.py").write_text(FAKE_GCLOUD)
    stand_in(bin_dir / "gcloud", f'exec {shlex.quote(sys.executable)} {tmp_path / "gcloud.py"} "$@"')
    (tmp_path / "state.json").write_text(json.dumps({**states, "log": str(tmp_path / "calls.jsonl")}))
    proc = subprocess.run(
        [
            sys.executable,
            str(LAUNCH / "tpu.py"),
            "run",
            "--accelerator-type=v5litepod-16",
            PROJECT,
            *TRAIN_FLAGS,
            "--repo=https://example.com/btoks.git",
            "--poll-seconds=0",
            *flags,
        ],
        check=False,
        env=dict(os.environ, PATH=str(bin_dir), FAKE_GCLOUD_STATE=str(tmp_path / "state.json")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    kinds = []
    for argv in calls:
        kind = " ".join(argv[2:4]) if argv[0] != "alpha" else " ".join(argv[3:5])  # argv without "gcloud"
        if kind == "tpu-vm ssh":
            script = flag(argv, "--command")
            kind = "probe" if "btoks-status" in script else "setup" if "uv venv" in script else "train"
            assert "--worker=all" in argv
        kinds.append(kind)
    return proc, kinds, calls


PREEMPTED_TWICE = {
    "queued": [
        "NOT_FOUND",
        "WAITING_FOR_RESOURCES",
        "ACTIVE",
        "ACTIVE",
        "ACTIVE",
        "NOT_FOUND",
        "ACTIVE",
        "SUSPENDED",
        "NOT_FOUND",
        "ACTIVE",
        "ACTIVE",
    ],
    "node": ["READY", "PREEMPTED", "READY"],
    "probe": ["not running", "running 5", "not running", "not running", "exited 0"],
}
NEW_SLICE = [
    "queued-resources describe",
    "queued-resources create",
    "queued-resources describe",
    "probe",
    "setup",
    "train",
]


def test_run_recreates_preempted_slices_and_resumes_with_the_same_workdir(tmp_path):
    proc, kinds, calls = run_loop(tmp_path, PREEMPTED_TWICE, "--max-preemptions=2")
    assert proc.returncode == 0, proc.stderr
    watch = ["queued-resources describe", "tpu-vm describe", "probe"]
    assert (
        kinds
        == [
            "queued-resources describe",
            "queued-resources create",
            "queued-resources describe",  # absent, waiting
            *NEW_SLICE[2:],  # ACTIVE
            *watch,  # running
            "queued-resources describe",
            "tpu-vm describe",
            "queued-resources delete",  # node PREEMPTED
            *NEW_SLICE,
            "queued-resources describe",
            "queued-resources delete",  # queued resource SUSPENDED
            *NEW_SLICE,
            *watch,
            "queued-resources delete",  # exited 0: done, slice deleted
        ]
    )
    trains = [
        flag(argv, "--command") for argv in calls if "--worker=all" in argv and "nohup" in flag(argv, "--command")
    ]
    assert len(trains) == 3 and len(set(trains)) == 1 and f"--workdir {WORKDIR} " in trains[0]
    assert "slice lost (node is PREEMPTED): re-creation 1 of at most 2" in proc.stdout
    assert "slice lost (queued resource is SUSPENDED): re-creation 2 of at most 2" in proc.stdout
    assert "training finished" in proc.stdout


@pytest.mark.parametrize(
    "statuses, summary",
    [
        (["running 5", "running 700", "running 0", "running 1"], "running 700"),
        (["exited 0", "running 30", "exited 0", "exited 0"], "running 30"),  # finishing: wait for every worker
        (["exited 0"] * 4, "exited 0"),
        (["running 5", "exited 0", "exited 137", "running 1"], "exited 137"),
        (["running 5", "not running", "running 1", "running 1"], "not running"),
        (["running 5", "running 5", "running 5"], None),  # a worker did not answer
    ],
)
def test_training_status_sums_up_every_worker(statuses, summary):
    noise = "Using ssh batch size of 4. Attempting to SSH into 1 nodes with a total of 4 workers.\n"
    output = noise + "".join(f"btoks-status: t1v-n-{i} {status}\n" for i, status in enumerate(statuses))
    assert tpu.training_status(output, workers=4) == summary


def test_run_gives_up_after_max_preemptions(tmp_path):
    proc, kinds, _ = run_loop(tmp_path, PREEMPTED_TWICE, "--max-preemptions=1")
    assert proc.returncode == 1
    assert "lost again (queued resource is SUSPENDED) after 1 re-creations; giving up" in proc.stderr
    assert kinds.count("queued-resources create") == 2


def test_run_restarts_crashed_training_a_bounded_number_of_times(tmp_path):
    states = {"queued": ["ACTIVE"], "node": ["READY"], "probe": ["running 0", "exited 1", "running 4000", "exited 1"]}
    proc, kinds, _ = run_loop(tmp_path, states, "--max-restarts=2", "--stall-minutes=60")
    assert proc.returncode == 1
    # Already running on an ACTIVE slice (a restarted launcher): no setup; then exit 1 and a silent log: two restarts.
    assert kinds.count("setup") == 0 and kinds.count("train") == 2 and "queued-resources delete" not in kinds
    assert "training exited with status 1: restart 1 of at most 2" in proc.stdout
    assert "training log silent for 66 min: restart 2 of at most 2" in proc.stdout
    assert "the slice is kept for inspection" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------------
# The TPU table and the benchmark import.


@pytest.mark.parametrize("name", list(topologies.TOPOLOGIES))
def test_topology_rows_are_consistent(name):
    entry = topologies.TOPOLOGIES[name]
    generation = topologies.GENERATIONS[entry["generation"]]
    assert entry["chips"] == entry["hosts"] * entry["chips_per_host"]
    assert entry["chips"] * generation["cores_per_chip"] == int(name.rsplit("-", 1)[1])
    assert math.prod(entry["mesh"][axis] for axis in topologies.MESH_AXES) == entry["chips"]
    assert entry["per_device_batch"] * entry["mesh"]["data"] * entry["mesh"]["fsdp"] == topologies.GLOBAL_BATCH
    assert entry["per_device_batch"] % entry["accum"] == 0
    assert entry["hbm_gib"] == generation["hbm_gib"]
    if not topologies.RESULTS_PATH.exists():
        assert entry["status"] == topologies.PROVISIONAL


def test_every_generation_has_single_and_multi_host_slices():
    for generation in topologies.GENERATIONS:
        hosts = {e["hosts"] for e in topologies.TOPOLOGIES.values() if e["generation"] == generation}
        assert 1 in hosts and max(hosts) > 1, generation


def test_readme_table_is_the_generated_one():
    readme = (LAUNCH / "README.md").read_text()
    assert topologies.readme_with_table(readme, topologies.markdown_table(topologies.TOPOLOGIES)) == readme
    assert "provisional until the ahead-of-time compile benchmark\n(`benchmarks/aot_compile_2b.py`)" in readme
    assert topologies.main(["--check-readme"]) == 0


def result(topology: str, mesh, per_device_batch: int, accum: int, gib: float, fits: bool) -> dict:
    return {
        "topology": topology,
        "mesh": mesh,
        "per_device_batch": per_device_batch,
        "accum": accum,
        "bytes_per_chip": int(gib * 2**30),
        "hbm_bytes": 16 * 2**30,
        "fits": fits,
    }


def test_apply_benchmark_picks_the_best_fitting_configuration(tmp_path, capsys):
    path = tmp_path / "aot.json"
    path.write_text(
        json.dumps(
            {
                "results": [
                    result("v5litepod-16", {"data": 4, "fsdp": 4, "tensor": 1}, 64, 16, 9.0, True),
                    result("v5litepod-16", [16, 1, 1], 64, 8, 15.0, True),
                    result("v5litepod-16", [2, 8, 1], 64, 8, 12.0, True),
                    result("v5litepod-16", [16, 1, 1], 64, 4, 19.0, False),
                    result("v4-8", [4, 1, 1], 256, 32, 40.0, False),
                ]
            }
        )
    )
    table = topologies.apply_benchmark(path)
    best = table["v5litepod-16"]
    # Fewest chunks first (8 beats 16; 4 does not fit), then the least fsdp x tensor.
    assert best["mesh"] == {"data": 16, "fsdp": 1, "tensor": 1} and (best["per_device_batch"], best["accum"]) == (64, 8)
    assert best["status"] == "compiled" and best["bytes_per_chip"] == 15 * 2**30
    assert table["v4-8"]["status"] == "does not fit" and table["v4-8"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert table["v6e-16"] == topologies.provisional_topologies()["v6e-16"]
    assert topologies.TOPOLOGIES["v5litepod-16"]["accum"] == 16  # the module's table is left alone
    markdown = topologies.markdown_table(table)
    assert (
        "| `v5litepod-16` | 16 | 4 | 4 | 16 GiB | (16, 1, 1) | 64 | 8 x 8 | AOT compile: fits, 15.0 of 16.0 GiB |"
        in markdown
    )
    assert "| `v4-8` |" in markdown and "AOT compile: does not fit (40.0 of 16.0 GiB)" in markdown
    assert topologies.main(["--results", str(path)]) == 0
    assert capsys.readouterr().out.strip() == markdown
    readme = f"intro\n{topologies.TABLE_BEGIN}\nold\n{topologies.TABLE_END}\nrest\n"
    assert (
        topologies.readme_with_table(readme, markdown)
        == f"intro\n{topologies.TABLE_BEGIN}\n{markdown}\n{topologies.TABLE_END}\nrest\n"
    )


@pytest.mark.parametrize(
    "record, message",
    [
        (result("v5litepod-16", [4, 2, 1], 128, 16, 9.0, True), "has 8 devices, the slice has 16 chips"),
        (result("v5litepod-16", [4, 4, 1], 32, 16, 9.0, True), "!= global batch 1024"),
        (result("v5litepod-16", [4, 4, 1], 64, 7, 9.0, True), "must be a positive multiple of accum"),
        (result("v5litepod-16", {"data": 4, "model": 4}, 64, 16, 9.0, True), "mesh must have exactly the axes"),
        (result("v7-8", [4, 1, 1], 256, 32, 9.0, True), "unknown topology 'v7-8'"),
        ({"topology": "v4-8", "mesh": [4, 1, 1]}, "missing field(s)"),
        (result("v4-8", [4, 1, 1], 256, 32, 9.0, "yes"), "fits must be true or false"),
    ],
)
def test_apply_benchmark_rejects_inconsistent_results(record, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        topologies.apply_benchmark([record])
