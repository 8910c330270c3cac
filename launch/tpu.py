"""Run btoks training on a Cloud TPU VM slice: create it, install on every worker, train, resume after preemption.

    python launch/tpu.py run --accelerator-type=v5litepod-16 --project=MY_PROJECT \
        --config=configs/qwen2vl_2b.py:data_root=/mnt/disks/data/mmeb_train --workdir=gs://MY_BUCKET/btoks/run1 \
        --config.model.hf_dir=gs://MY_BUCKET/models/Qwen2-VL-2B-Instruct --config.KEY=VALUE

The configs are configs/qwen2vl_2b.py (the 2B recipe), configs/qwen2vl_2b_v2.py (its v2 variant) and
configs/tiny_cpu.py; the 2B ones take data_root=DIR after a colon. The workdir (checkpoints, metrics.jsonl,
TensorBoard events) and the Hugging Face weights directory (--config.model.hf_dir) may be in Cloud Storage; the
training data folder must be present at the same path on every worker.

Subcommands: create, setup, train, logs, status, teardown, and run (= create + setup + train, re-created and resumed
after every preemption). Each takes --dry-run, which prints the exact commands, one per line after "+ ", and runs
nothing. Standard library only, so it runs on any machine with Python 3.10+ and the gcloud CLI. See launch/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import topologies  # launch/ is on sys.path when this file runs as a script

REPO_ROOT = Path(__file__).resolve().parent.parent
CMD_PREFIX = "+ "
NOTE_PREFIX = "# "

# Files on every TPU worker, relative to the login user's home directory (where ssh commands start).
REMOTE_REPO = "btoks_jax"
REMOTE_VENV = "btoks_venv"
REMOTE_TARBALL = "btoks_src.tar.gz"
REMOTE_LOG = "btoks_train.log"
REMOTE_PID = "btoks_train.pid"
REMOTE_EXIT = "btoks_train.exit"
# Left out of a --source upload: build output, caches and local runs that only bloat the copy.
SOURCE_EXCLUDES = (".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "./runs", "./workdir")

# Queued-resource states (google.cloud.tpu QueuedResourceState) and TPU node states that mean the slice is gone.
QR_LOST = ("SUSPENDING", "SUSPENDED", "FAILED")
NODE_LOST = ("PREEMPTED", "TERMINATED")
ABSENT = ""  # what a describe of a queued resource that does not exist reads as

NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
ZONE_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
PROJECT_RE = re.compile(r"([a-z][-a-z0-9.]*:)?[a-z][-a-z0-9]{4,28}[a-z0-9]")
BUCKET_RE = re.compile(r"[a-z0-9][-a-z0-9._]{1,220}[a-z0-9]")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
OVERRIDE_RE = re.compile(r"--config\.[A-Za-z_][A-Za-z0-9_.]*=.*", re.DOTALL)


class LaunchError(Exception):
    """A failure explained to the user in one message (exit status 1, no traceback)."""


class UsageError(Exception):
    """A bad flag value; the message names the flag (exit status 2)."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")


# ----------------------------------------------------------------------------------------------------------------------
# Running commands: print each one; under --dry-run print only.


class Shell:
    """Prints every command it runs; under --dry-run it only prints."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def note(self, message: str) -> None:
        # Real runs are long; timestamps tell when a slice was lost or re-created. Dry runs stay reproducible.
        stamp = "" if self.dry_run else time.strftime("[%Y-%m-%d %H:%M:%S] ")
        print(NOTE_PREFIX + stamp + message, flush=True)

    def run(self, argv: list[str], *, capture: bool = False, check: bool = True, echo: bool = True):
        """Runs argv (printing it first); returns the CompletedProcess, or None under --dry-run."""
        if echo or self.dry_run:
            print(CMD_PREFIX + shlex.join(argv), flush=True)
        if self.dry_run:
            return None
        if shutil.which(argv[0]) is None:
            if argv[0] == "gcloud":
                raise LaunchError(
                    "gcloud (the Google Cloud CLI) is not on PATH: install it (https://cloud.google.com/sdk/docs/install"
                    "), run `gcloud auth login`, or add --dry-run to only print the commands"
                )
            raise LaunchError(f"{argv[0]} is not on PATH; it is needed for: {shlex.join(argv)}")
        proc = subprocess.run(argv, check=False, text=True, capture_output=capture)
        if check and proc.returncode != 0:
            detail = f":\n{proc.stderr.strip()[-2000:]}" if capture and proc.stderr else ""
            raise LaunchError(f"command failed with exit status {proc.returncode}: {shlex.join(argv)}{detail}")
        return proc


# ----------------------------------------------------------------------------------------------------------------------
# gcloud command lines for one slice. The queued resource and its TPU node share one name.


GCLOUD_TPUS = ["gcloud", "compute", "tpus"]


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    zone: str
    project: str | None

    @property
    def location(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def create(self, accelerator_type: str, runtime_version: str, provisioning: str, extra: list[str]) -> list[str]:
        # best-effort is a tier of the alpha API only; the others are in the GA command.
        group = ["gcloud", "alpha", "compute", "tpus"] if provisioning == "best-effort" else GCLOUD_TPUS
        tier = {"spot": ["--spot"], "reserved": ["--reserved"], "best-effort": ["--best-effort"], "on-demand": []}
        node = [
            f"--node-id={self.name}",
            f"--accelerator-type={accelerator_type}",
            f"--runtime-version={runtime_version}",
        ]
        return [*group, "queued-resources", "create", self.name, *node, *self.location, *tier[provisioning], *extra]

    def queued_state(self) -> list[str]:
        return [*GCLOUD_TPUS, "queued-resources", "describe", self.name, *self.location, "--format=value(state.state)"]

    def node_state(self) -> list[str]:
        return [*GCLOUD_TPUS, "tpu-vm", "describe", self.name, *self.location, "--format=value(state)"]

    def describe(self) -> list[str]:
        return [*GCLOUD_TPUS, "queued-resources", "describe", self.name, *self.location]

    def delete(self) -> list[str]:
        # --force deletes the TPU node with the queued resource; --quiet because run deletes unattended.
        return [*GCLOUD_TPUS, "queued-resources", "delete", self.name, *self.location, "--force", "--quiet"]

    def ssh(self, script: str, worker: str = "all") -> list[str]:
        return [*GCLOUD_TPUS, "tpu-vm", "ssh", self.name, *self.location, f"--worker={worker}", f"--command={script}"]

    def scp(self, local: str, remote: str, worker: str = "all") -> list[str]:
        return [*GCLOUD_TPUS, "tpu-vm", "scp", local, f"{self.name}:{remote}", *self.location, f"--worker={worker}"]


# ----------------------------------------------------------------------------------------------------------------------
# Scripts run on the workers. One line each, so that every printed command stays on one line.


def _script(*statements: str) -> str:
    return "; ".join(statements)


# jax must import without torch: transformers is the only torch-aware dependency, and it works without it.
_CHECK_INSTALL_PY = (
    "import importlib.util, socket, jax; "
    'assert importlib.util.find_spec("torch") is None, "torch is installed; TPU workers must stay torch-free"; '
    'print(socket.gethostname(), "ready: jax", jax.__version__)'
)


def setup_script(repo: str | None, ref: str, python: str) -> str:
    if repo:
        fetch = (
            f"git clone --quiet {shlex.quote(repo)} {REMOTE_REPO}",
            f"git -C {REMOTE_REPO} checkout --quiet {shlex.quote(ref)}",
        )
    else:
        fetch = (f"mkdir {REMOTE_REPO}", f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_REPO}", f"rm {REMOTE_TARBALL}")
    return _script(
        "set -euo pipefail",
        'cd "$HOME"',
        f"rm -rf {REMOTE_REPO}",
        *fetch,
        # The TPU images ship Python 3.10 and jax needs 3.11+: uv brings its own interpreter into a venv.
        'export PATH="$HOME/.local/bin:$PATH"',
        "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh",
        f"rm -rf {REMOTE_VENV}",
        f"uv venv --quiet --python {shlex.quote(python)} {REMOTE_VENV}",
        # The tpu extra brings jax[tpu] (libtpu); no torch on TPU workers.
        f"uv pip install --quiet --python {REMOTE_VENV}/bin/python -e '{REMOTE_REPO}[tpu]'",
        f"{REMOTE_VENV}/bin/python -c {shlex.quote(_CHECK_INSTALL_PY)}",
    )


def devices_script(multihost: bool) -> str:
    init = "jax.distributed.initialize(); " if multihost else ""
    code = (
        f'import jax; {init}print(f"process {{jax.process_index()}} of {{jax.process_count()}}: '
        f'{{jax.local_device_count()}} local, {{jax.device_count()}} global devices")'
    )
    return _script('cd "$HOME"', f"{REMOTE_VENV}/bin/python -c {shlex.quote(code)}")


def train_script(
    config: str, workdir: str, overrides: list[str], env: list[str], multihost: bool, restart: bool
) -> str:
    btoks = shlex.join(["train", "--config", config, "--workdir", workdir, *overrides])
    # setsid makes the job its own process group (pgid = the pid saved below) so a restart can stop all of it;
    # the exit file tells `run` whether training finished or crashed.
    job = f'cd "$HOME/{REMOTE_REPO}" && "$HOME/{REMOTE_VENV}/bin/btoks" {btoks}; echo $? > "$HOME/{REMOTE_EXIT}"'
    running = f'[ -f {REMOTE_PID} ] && kill -0 "$(cat {REMOTE_PID})" 2>/dev/null'
    if restart:
        stop = (
            f'if {running}; then kill -TERM -- "-$(cat {REMOTE_PID})" || true; '
            f'for _ in $(seq 300); do kill -0 "$(cat {REMOTE_PID})" 2>/dev/null || break; sleep 0.2; done; '
            f'kill -KILL -- "-$(cat {REMOTE_PID})" 2>/dev/null || true; fi'
        )
    else:
        stop = (
            f'if {running}; then echo "training is already running on $(hostname) (pid $(cat {REMOTE_PID})); '
            f'use train --restart to replace it" >&2; exit 1; fi'
        )
    # BTOKS_DISTRIBUTED=1 makes the trainer call jax.distributed.initialize(), which finds the other workers of
    # the slice from the TPU metadata; a single host needs no coordination.
    exports = ["PYTHONUNBUFFERED=1", *(["BTOKS_DISTRIBUTED=1"] if multihost else [])]
    exports += [f"{key}={shlex.quote(value)}" for key, value in (item.split("=", 1) for item in env)]
    return _script(
        "set -euo pipefail",
        'cd "$HOME"',
        stop,
        f"rm -f {REMOTE_EXIT}",
        "export " + " ".join(exports),
        f'echo "=== btoks train started $(date -u +%FT%TZ) on $(hostname) ===" >> {REMOTE_LOG}',
        f"setsid nohup bash -c {shlex.quote(job)} >> {REMOTE_LOG} 2>&1 < /dev/null & echo $! > {REMOTE_PID}",
        f'echo "$(hostname): training started (pid $!), log ~/{REMOTE_LOG}"',
    )


# Prints "btoks-status: HOST STATUS", STATUS being "running SECONDS_SINCE_THE_LOG_LAST_GREW", "exited CODE" or
# "not running". The tag finds the line among whatever else gcloud prints for each worker.
PROBE_SCRIPT = _script(
    'cd "$HOME"',
    'tag="btoks-status: $(hostname)"',
    f'if [ -f {REMOTE_EXIT} ]; then echo "$tag exited $(cat {REMOTE_EXIT})"; '
    f'elif [ -f {REMOTE_PID} ] && kill -0 "$(cat {REMOTE_PID})" 2>/dev/null; '
    f'then echo "$tag running $(( $(date +%s) - $(stat -c %Y {REMOTE_LOG}) ))"; '
    f'else echo "$tag not running"; fi',
)
STATUS_RE = re.compile(r"btoks-status: (\S+) (running (\d+)|exited (-?\d+)|not running)")


def training_status(probe_output: str, workers: int) -> str | None:
    """Sums up the workers' probe lines: 'exited 0' once every worker finished, else the first failure ('exited
    CODE', 'not running'), else 'running SECONDS' of the longest-silent log; None unless every worker answered."""
    by_host = {m[1]: m for m in map(STATUS_RE.search, probe_output.splitlines()) if m}
    if len(by_host) < workers:
        return None
    statuses = [m[2] for m in by_host.values()]
    failures = [status for status in statuses if status.startswith("exited") and status != "exited 0"]
    if failures or "not running" in statuses:
        return (failures or ["not running"])[0]
    silent = [int(m[3]) for m in by_host.values() if m[3] is not None]
    return f"running {max(silent)}" if silent else "exited 0"


def logs_script(lines: int, follow: bool, all_workers: bool) -> str:
    tail = f'tail -n {lines}{" -F" if follow else ""} "$HOME/{REMOTE_LOG}"'
    # Lines of several workers interleave: prefix each with its host.
    return f'{tail} 2>&1 | sed -u "s/^/[$(hostname)] /"' if all_workers else tail


# ----------------------------------------------------------------------------------------------------------------------
# The commands of each step.


def create_commands(a: argparse.Namespace) -> list[list[str]]:
    return [a.slice.create(a.accelerator_type, a.runtime_version, a.provisioning, a.create_arg)]


def setup_commands(a: argparse.Namespace) -> list[list[str]]:
    commands = []
    if not a.repo:
        tarball = str(Path(tempfile.gettempdir()) / f"btoks-src-{a.name}.tar.gz")
        excludes = [f"--exclude={pattern}" for pattern in SOURCE_EXCLUDES]
        commands += [
            ["tar", "-czf", tarball, *excludes, "-C", str(a.source), "."],
            a.slice.scp(tarball, REMOTE_TARBALL),
        ]
    commands.append(a.slice.ssh(setup_script(a.repo, a.ref, a.python)))
    if a.check_devices:
        commands.append(a.slice.ssh(devices_script(a.topology["hosts"] > 1)))
    return commands


def train_commands(a: argparse.Namespace, restart: bool) -> list[list[str]]:
    multihost = a.topology["hosts"] > 1
    return [a.slice.ssh(train_script(a.config, a.workdir, a.overrides, a.env, multihost, restart))]


def run_all(sh: Shell, commands: list[list[str]]) -> None:
    for argv in commands:
        sh.run(argv)


def note_topology(a: argparse.Namespace, sh: Shell) -> None:
    sh.note(topologies.describe(a.accelerator_type, a.topology))
    if a.topology["status"] == "does not fit":
        sh.note(f"warning: the ahead-of-time compile benchmark found no configuration that fits {a.accelerator_type}")


# ----------------------------------------------------------------------------------------------------------------------
# Subcommands.


def cmd_create(a: argparse.Namespace, sh: Shell) -> int:
    note_topology(a, sh)
    run_all(sh, create_commands(a))
    sh.note(f"the slice is queued; `status` shows when it is ACTIVE (workers: {a.topology['hosts']})")
    return 0


def cmd_setup(a: argparse.Namespace, sh: Shell) -> int:
    run_all(sh, setup_commands(a))
    return 0


def cmd_train(a: argparse.Namespace, sh: Shell) -> int:
    note_topology(a, sh)
    note_weights(a, sh)
    run_all(sh, train_commands(a, a.restart))
    sh.note(f"training runs in the background on every worker; workdir {a.workdir}; follow it with `logs`")
    return 0


def cmd_logs(a: argparse.Namespace, sh: Shell) -> int:
    worker = "all" if a.all_workers else "0"
    sh.run(a.slice.ssh(logs_script(a.lines, not a.no_follow, a.all_workers), worker=worker), check=False)
    return 0


def cmd_status(a: argparse.Namespace, sh: Shell) -> int:
    found = sh.run(a.slice.describe(), check=False)
    if found is not None and found.returncode != 0:
        sh.note(f"no queued resource {a.name} in {a.zone} (or gcloud could not read it)")
        return 1
    sh.run(a.slice.ssh(PROBE_SCRIPT), check=False)
    sh.run(a.slice.ssh(f'tail -n 20 "$HOME/{REMOTE_LOG}"', worker="0"), check=False)
    return 0


def cmd_teardown(a: argparse.Namespace, sh: Shell) -> int:
    sh.run(a.slice.delete())
    sh.note("deleted the queued resource and its TPU node; the bucket and its checkpoints are kept")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# run: create + setup + train, and keep it going through preemptions.


def print_run_plan(a: argparse.Namespace, sh: Shell) -> None:
    poll, stall = a.poll_seconds, a.stall_minutes
    wait = f"at most {a.max_wait_hours:g} h" if a.max_wait_hours else "no time limit"
    sh.note(f"1. create the slice, unless queued resource {a.name} already exists:")
    sh.run(a.slice.queued_state())
    run_all(sh, create_commands(a))
    sh.note(f"2. wait until the queued resource is ACTIVE, polling every {poll:g} s ({wait}):")
    sh.run(a.slice.queued_state())
    sh.note("3. install on every worker (skipped with 4. when the workers already run training):")
    sh.run(a.slice.ssh(PROBE_SCRIPT))
    run_all(sh, setup_commands(a))
    sh.note(f"4. start training on every worker, always with --workdir {a.workdir}, so that a new slice resumes")
    sh.note("   from the latest checkpoint there:")
    run_all(sh, train_commands(a, restart=True))
    sh.note(f"5. watch every {poll:g} s:")
    run_all(sh, [a.slice.queued_state(), a.slice.node_state(), a.slice.ssh(PROBE_SCRIPT)])
    sh.note(
        f"6. on preemption (queued resource {', '.join(QR_LOST)}, or node {', '.join(NODE_LOST)}), at most "
        f"{a.max_preemptions} times: delete the slice, then re-create it, reinstall and restart training from 1.:"
    )
    sh.run(a.slice.delete())
    stalled = f", or its log is silent for {stall:g} min" if stall else ""
    sh.note(
        f"7. when training exits non-zero or dies on any worker of a live slice{stalled}, at most "
        f"{a.max_restarts} times:"
    )
    sh.note("   restart it on every worker:")
    run_all(sh, train_commands(a, restart=True))
    keep = "keep the slice (--keep-slice)" if a.keep_slice else "delete the slice"
    sh.note(f"8. when training exits 0 on every worker: {keep}; the bucket and its checkpoints are kept")
    if not a.keep_slice:
        sh.run(a.slice.delete())


def queued_state(a: argparse.Namespace, sh: Shell) -> str | None:
    """The queued resource's state, ABSENT if there is none, None if gcloud failed otherwise."""
    proc = sh.run(a.slice.queued_state(), capture=True, check=False, echo=False)
    if proc.returncode == 0:
        return proc.stdout.strip()
    return ABSENT if "NOT_FOUND" in proc.stderr or "not found" in proc.stderr.lower() else None


def probe(a: argparse.Namespace, sh: Shell) -> str | None:
    """The training on the slice (see training_status), or None if some worker did not answer over ssh."""
    proc = sh.run(a.slice.ssh(PROBE_SCRIPT), capture=True, check=False, echo=False)
    return training_status(proc.stdout, a.topology["hosts"])


def wait_until_active(a: argparse.Namespace, sh: Shell, counts: dict[str, int]) -> None:
    """Creates the slice if needed (re-creating a lost one) and returns once it is ACTIVE."""
    deadline = time.monotonic() + a.max_wait_hours * 3600 if a.max_wait_hours else None
    last = None
    while True:
        state = queued_state(a, sh)
        if state is None:
            raise LaunchError(f"could not read queued resource {a.name}: run `{shlex.join(a.slice.describe())}`")
        if state != last:
            sh.note(f"queued resource {a.name}: {state or 'absent'}")
            last = state
        if state == "ACTIVE":
            return
        if state in QR_LOST:
            lost_slice(a, sh, counts, f"queued resource is {state}")
            continue
        if state == ABSENT:
            run_all(sh, create_commands(a))
            continue
        if deadline is not None and time.monotonic() > deadline:
            raise LaunchError(
                f"{a.name} is still {state} after {a.max_wait_hours:g} h; the request stays queued "
                f"(`teardown` drops it, or rerun `run` to keep waiting)"
            )
        time.sleep(a.poll_seconds)


def lost_slice(a: argparse.Namespace, sh: Shell, counts: dict[str, int], why: str) -> None:
    counts["preemptions"] += 1
    if counts["preemptions"] > a.max_preemptions:
        raise LaunchError(f"slice {a.name} lost again ({why}) after {a.max_preemptions} re-creations; giving up")
    sh.note(f"slice lost ({why}): re-creation {counts['preemptions']} of at most {a.max_preemptions}")
    sh.run(a.slice.delete(), check=False)


def restart_training(a: argparse.Namespace, sh: Shell, counts: dict[str, int], why: str) -> None:
    counts["restarts"] += 1
    if counts["restarts"] > a.max_restarts:
        raise LaunchError(
            f"training {why} on a live slice, {a.max_restarts} restarts already spent; the slice is kept for "
            f"inspection: `python launch/tpu.py logs --name={a.name} --zone={a.zone} --all-workers`, then `teardown`"
        )
    sh.note(f"training {why}: restart {counts['restarts']} of at most {a.max_restarts}")
    run_all(sh, train_commands(a, restart=True))


def start(a: argparse.Namespace, sh: Shell) -> None:
    """Setup and train on an ACTIVE slice, unless training already runs there (a launcher restarted mid-run)."""
    status = probe(a, sh)
    if status is not None and status.startswith("running"):
        sh.note("training already runs on the workers: watching it")
        return
    # A slice that just turned ACTIVE may refuse ssh for a minute while its workers boot.
    for attempt in range(1, 6):
        try:
            run_all(sh, setup_commands(a))
            break
        except LaunchError as e:
            if attempt == 5:
                raise
            sh.note(f"setup failed (attempt {attempt} of 5), retrying in {a.poll_seconds:g} s: {e}")
            time.sleep(a.poll_seconds)
    run_all(sh, train_commands(a, restart=True))


def cmd_run(a: argparse.Namespace, sh: Shell) -> int:
    note_topology(a, sh)
    note_weights(a, sh)
    if a.dry_run:
        print_run_plan(a, sh)
        return 0
    counts = {"preemptions": 0, "restarts": 0}
    wait_until_active(a, sh, counts)
    start(a, sh)
    unreadable = 0
    while True:
        time.sleep(a.poll_seconds)
        state = queued_state(a, sh)
        if state is None:
            unreadable += 1
            if unreadable >= 10:
                raise LaunchError(f"could not read queued resource {a.name} 10 times in a row; giving up")
            continue
        unreadable = 0
        if state != "ACTIVE":
            lost_slice(a, sh, counts, f"queued resource is {state or 'gone'}")
            wait_until_active(a, sh, counts)
            start(a, sh)
            continue
        node = sh.run(a.slice.node_state(), capture=True, check=False, echo=False)
        if node.returncode == 0 and node.stdout.strip() in NODE_LOST:
            lost_slice(a, sh, counts, f"node is {node.stdout.strip()}")
            wait_until_active(a, sh, counts)
            start(a, sh)
            continue
        status = probe(a, sh)
        if status is None:
            sh.note("could not reach every worker over ssh; checking again later")
        elif status == "exited 0":
            sh.note(f"training finished; checkpoints and metrics are in {a.workdir}")
            if not a.keep_slice:
                sh.run(a.slice.delete())
            return 0
        elif status.startswith("exited"):
            restart_training(a, sh, counts, f"exited with status {status.split()[-1]}")
        elif status == "not running":
            restart_training(a, sh, counts, "died without an exit status")
        elif (silent := re.fullmatch(r"running (\d+)", status)) and 0 < a.stall_minutes * 60 < int(silent[1]):
            restart_training(a, sh, counts, f"log silent for {int(silent[1]) // 60} min")


# ----------------------------------------------------------------------------------------------------------------------
# Flags and their checks.


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates --config.KEY=VALUE overrides (passed through to btoks train) from the launcher's own flags.

    argparse would take --config.KEY for an unknown flag, so overrides never reach it.
    """
    return [arg for arg in argv if arg.startswith("--config.")], [
        arg for arg in argv if not arg.startswith("--config.")
    ]


def check_overrides(overrides: list[str], command: str) -> None:
    for arg in overrides:
        if command not in ("train", "run"):
            raise UsageError(arg.split("=", 1)[0], f"config overrides go to train or run, not {command}")
        if not OVERRIDE_RE.fullmatch(arg):
            raise UsageError(arg.split("=", 1)[0], "config overrides take the form --config.KEY=VALUE")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command-line parser, and the parser of each subcommand (for usage errors that show its flags)."""
    epilog = "train and run pass --config.KEY=VALUE overrides through to btoks train. See launch/README.md."
    parser = argparse.ArgumentParser(prog="tpu.py", description=__doc__.split("\n\n")[0], epilog=epilog)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", help="queued resource and TPU node name (default: btoks-ACCELERATOR_TYPE)")
    common.add_argument("--accelerator-type", help=f"TPU type, one of: {', '.join(topologies.TOPOLOGIES)}")
    common.add_argument("--zone", help="zone, e.g. us-east5-b (default: a zone that offers the accelerator type)")
    common.add_argument("--project", help="Google Cloud project (default: gcloud's configured project)")
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")

    create = argparse.ArgumentParser(add_help=False)
    create.add_argument("--runtime-version", help="TPU VM image (default: the generation's, see README)")
    create.add_argument(
        "--provisioning",
        choices=("spot", "reserved", "on-demand", "best-effort"),
        default="spot",
        help="queued-resource tier (default: spot; run re-creates preempted slices)",
    )
    create.add_argument(
        "--create-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for queued-resources create, e.g. --create-arg=--network=my-net (repeatable)",
    )

    setup = argparse.ArgumentParser(add_help=False)
    source = setup.add_mutually_exclusive_group()
    source.add_argument("--repo", help="git URL to clone on every worker (default: upload --source)")
    source.add_argument("--source", type=Path, default=REPO_ROOT, help="local checkout to upload (default: this one)")
    setup.add_argument("--ref", default="main", help="branch, tag or commit of --repo (default: main)")
    setup.add_argument("--python", default="3.12", help="Python version of the workers' venv (default: 3.12)")
    setup.add_argument("--check-devices", action="store_true", help="after install, print every worker's devices")

    train = argparse.ArgumentParser(add_help=False)
    train.add_argument("--config", help="btoks config file, relative to the repository root")
    train.add_argument("--workdir", help="gs://BUCKET/PATH for checkpoints and metrics (resume reads it)")
    train.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="worker env var (repeatable)")

    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    sub.add_parser("create", parents=[common, create], help="queue a TPU slice (queued resource)")
    sub.add_parser("setup", parents=[common, setup], help="install btoks on every worker")
    p = sub.add_parser(
        "train", parents=[common, train], help="start btoks train on every worker, in the background", epilog=epilog
    )
    p.add_argument("--restart", action="store_true", help="stop a running training first")
    p = sub.add_parser("logs", parents=[common], help="tail the training log of worker 0 (or all workers)")
    p.add_argument("--all-workers", action="store_true", help="every worker's log, lines prefixed with the host")
    p.add_argument("--lines", type=int, default=100, help="lines of history (default: 100)")
    p.add_argument("--no-follow", action="store_true", help="print and exit instead of following")
    sub.add_parser("status", parents=[common], help="queued resource state and every worker's training")
    sub.add_parser("teardown", parents=[common], help="delete the queued resource and its node (never the bucket)")
    p = sub.add_parser(
        "run",
        parents=[common, create, setup, train],
        help="create + setup + train, resume on preemption",
        epilog=epilog,
    )
    p.add_argument("--poll-seconds", type=float, default=120, help="state polling interval (default: 120)")
    p.add_argument("--max-preemptions", type=int, default=20, help="slice re-creations before giving up (default: 20)")
    p.add_argument("--max-restarts", type=int, default=3, help="training restarts on a live slice (default: 3)")
    p.add_argument("--max-wait-hours", type=float, default=24, help="wait for capacity, per slice; 0: forever")
    p.add_argument("--stall-minutes", type=float, default=60, help="restart when the log is silent this long; 0: off")
    p.add_argument("--keep-slice", action="store_true", help="keep the slice after training finishes")
    return parser, sub.choices


EXAMPLE_CONFIG = "configs/qwen2vl_2b.py:data_root=DIR"
WEIGHTS_OVERRIDE = "--config.model.hf_dir="


def check_config(config: str, root: Path) -> None:
    """The config file (before any `:ARGS`) must exist in the checkout that the workers run."""
    file = config.split(":", 1)[0]
    if not (root / file).is_file():
        known = ", ".join(sorted(str(p.relative_to(root)) for p in (root / "configs").glob("*.py"))) or "none"
        raise UsageError("--config", f"{file} is not a file of {root} (configs there: {known})")


def note_weights(a: argparse.Namespace, sh: Shell) -> None:
    """The Hugging Face weights directory goes to every worker unchanged; a local path must exist on each of them."""
    for override in a.overrides:
        if override.startswith(WEIGHTS_OVERRIDE):
            where = override[len(WEIGHTS_OVERRIDE):]
            if where and not where.startswith("gs://"):
                sh.note(f"weights from {where}: a path on the workers, which every worker must have (a gs:// "
                        "directory is read from the bucket instead)")


def validate(a: argparse.Namespace) -> None:
    """Fills defaults that depend on the accelerator type and checks every flag; raises UsageError."""
    needs_type = a.command in ("create", "train", "run")
    if a.accelerator_type is None:
        if needs_type:
            raise UsageError("--accelerator-type", f"required for {a.command}")
    elif a.accelerator_type not in topologies.TOPOLOGIES:
        generation, _, size = a.accelerator_type.rpartition("-")
        alias = topologies.GENERATION_ALIASES.get(generation)
        hint = f" (did you mean {alias}-{size}?)" if alias and f"{alias}-{size}" in topologies.TOPOLOGIES else ""
        raise UsageError(
            "--accelerator-type",
            f"unknown TPU type {a.accelerator_type!r}{hint}; known: {', '.join(topologies.TOPOLOGIES)}",
        )
    generation = topologies.GENERATIONS[topologies.generation_of(a.accelerator_type)] if a.accelerator_type else None
    a.topology = topologies.TOPOLOGIES.get(a.accelerator_type)

    if a.name is None:
        if a.accelerator_type is None:
            raise UsageError("--name", "required (or give --accelerator-type to use btoks-ACCELERATOR_TYPE)")
        a.name = f"btoks-{a.accelerator_type}"
    if not NAME_RE.fullmatch(a.name):
        raise UsageError("--name", f"{a.name!r} must be 1-63 lowercase letters, digits or '-', starting with a letter")
    if a.zone is None:
        if generation is None:
            raise UsageError("--zone", "required (or give --accelerator-type to use its default zone)")
        a.zone = generation["zone"]
    if not ZONE_RE.fullmatch(a.zone):
        raise UsageError("--zone", f"{a.zone!r} is not a zone name like us-east5-b")
    if a.project is not None and not PROJECT_RE.fullmatch(a.project):
        raise UsageError("--project", f"{a.project!r} is not a project ID (6-30 lowercase letters, digits, '-')")
    a.slice = Slice(a.name, a.zone, a.project)

    if a.command in ("create", "run"):
        a.runtime_version = a.runtime_version or generation["runtime_version"]
        if not re.fullmatch(r"[a-z0-9][-a-z0-9.]*", a.runtime_version):
            raise UsageError("--runtime-version", f"{a.runtime_version!r} is not a TPU runtime version")
        if a.provisioning not in generation["provisioning"]:
            raise UsageError(
                "--provisioning",
                f"{a.provisioning} is not offered for {a.accelerator_type}; "
                f"choose from {', '.join(generation['provisioning'])}",
            )
        for flag in a.create_arg:
            if not flag.startswith("--"):
                raise UsageError("--create-arg", f"{flag!r} must be a gcloud flag such as --network=NAME")
    if a.command in ("setup", "run"):
        if a.repo is not None and not a.repo.strip():
            raise UsageError("--repo", "empty URL")
        if not re.fullmatch(r"[^\s]+", a.ref):
            raise UsageError("--ref", f"{a.ref!r} is not a git ref")
        if a.repo is None and not (a.source / "pyproject.toml").is_file():
            raise UsageError("--source", f"{a.source} is not a checkout of this project (no pyproject.toml)")
        if not re.fullmatch(r"3\.\d+", a.python):
            raise UsageError("--python", f"{a.python!r} is not a Python version like 3.12")
        if a.check_devices and a.topology is None:
            raise UsageError("--check-devices", "needs --accelerator-type (single host or multi-host)")
    if a.command in ("train", "run"):
        if not a.config:
            raise UsageError("--config", f"required: the btoks config file, e.g. {EXAMPLE_CONFIG}")
        if not a.workdir:
            raise UsageError("--workdir", "required: gs://BUCKET/PATH")
        if not a.workdir.startswith("gs://"):
            raise UsageError(
                "--workdir",
                f"{a.workdir!r} must be a Cloud Storage path gs://BUCKET/PATH: every worker, and every re-created "
                "slice, reads and writes the same checkpoints there",
            )
        bucket, _, path = a.workdir[len("gs://") :].partition("/")
        if not BUCKET_RE.fullmatch(bucket):
            raise UsageError("--workdir", f"{bucket!r} is not a valid bucket name")
        if not path.strip("/"):
            raise UsageError("--workdir", f"give a folder inside the bucket, e.g. gs://{bucket}/btoks/run1")
        a.workdir = a.workdir.rstrip("/")
        check_config(a.config, REPO_ROOT if getattr(a, "repo", None) or a.command == "train" else a.source)
        for item in a.env:
            key, eq, _ = item.partition("=")
            if not eq or not ENV_KEY_RE.fullmatch(key):
                raise UsageError("--env", f"{item!r} must be KEY=VALUE")
    if a.command == "logs" and a.lines < 0:
        raise UsageError("--lines", "must be 0 or more")
    if a.command == "run":
        for flag in ("poll_seconds", "max_preemptions", "max_restarts", "max_wait_hours", "stall_minutes"):
            if getattr(a, flag) < 0:
                raise UsageError("--" + flag.replace("_", "-"), "must be 0 or more")


COMMANDS = {
    "create": cmd_create,
    "setup": cmd_setup,
    "train": cmd_train,
    "logs": cmd_logs,
    "status": cmd_status,
    "teardown": cmd_teardown,
    "run": cmd_run,
}


def main(argv: list[str] | None = None) -> int:
    parser, subcommands = build_parser()
    overrides, argv = split_overrides(sys.argv[1:] if argv is None else argv)
    a = parser.parse_args(argv)
    a.overrides = overrides
    try:
        check_overrides(a.overrides, a.command)
        validate(a)
    except UsageError as e:
        subcommands[a.command].error(str(e))
    try:
        return COMMANDS[a.command](a, Shell(a.dry_run))
    except LaunchError as e:
        print(f"tpu.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ntpu.py: interrupted; the slice keeps running (`status`, `teardown` --name={a.name})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
