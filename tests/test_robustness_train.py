"""Training robustness: bad rows, bad numbers, faults and config mistakes.

- Bad rows: `data.on_bad_row="skip"` replaces an unusable row by the next row of its data set's sample order,
  counts it and stops past `data.max_skip_fraction`; without bad rows the batches are those of "fail".
- Bad numbers: a step with a non-finite loss is not applied, and `train.max_nonfinite_steps` of them in a row
  stop the run without saving, naming the batch's data sets and rows.
- Faults: a save onto a full file system fails loudly and keeps the previous checkpoint; a run SIGKILLed again
  and again at random points, inside saves included, and resumed each time, logs the uninterrupted run's losses
  and skip counts; resuming with a config that changes the data or the math is refused, naming the keys.
- Config mistakes fail before anything compiles: unknown keys, impossible meshes, unnamed parameters, buckets
  too small for one image.

The trainer runs are subprocesses on one CPU device (the persistent compilation cache makes their restarts
cheap): a one-layer model on one emoji task, contrastive only, so that a run compiles a single step program.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import train_utils as U
from flax import nnx

from btoks_jax import checkpoint, sharding, train
from btoks_jax.data.emoji_dataset import build_emoji_dataset
from btoks_jax.data.mmeb_train import DatasetSpec
from btoks_jax.data.pipeline import BadRowsError, PipelineConfig, TrainBatchIterator, check_budgets
from btoks_jax.model_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
HANG_S = 1800  # only a guard against hangs: a loaded machine may be many times slower than an idle one
TMP = ".orbax-checkpoint-tmp"


# ===================================== shared data and trainer runs =====================================


@pytest.fixture(scope="module")
def emoji(tmp_path_factory):
    return build_emoji_dataset(tmp_path_factory.mktemp("emoji") / "data", max_concepts=24)


def _rows_with_a_broken_image(emoji, path, bad_row: int = 2):
    """The emoji_i2t training rows, row `bad_row` (0-based) pointing at an image file that is not an image."""
    rows = [json.loads(line) for line in emoji.train["emoji_i2t"].read_text().splitlines()]
    (emoji.root / "images" / "broken.png").write_bytes(b"not a png at all")
    rows[bad_row] = {**rows[bad_row], "qry_image_path": "images/broken.png"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, len(rows)


@pytest.fixture(scope="module")
def run_config(emoji, tmp_path_factory):
    """A config file: configs/tiny_cpu.py:runlocal reduced to one layer, one task (with one broken image, skipped),
    the contrastive loss, a checkpoint every step."""
    folder = tmp_path_factory.mktemp("config")
    rows, _ = _rows_with_a_broken_image(emoji, folder / "i2t_bad.jsonl")
    path = folder / "robust_cpu.py"
    path.write_text(textwrap.dedent(f"""\
        import importlib.util

        spec = importlib.util.spec_from_file_location("tiny_cpu", {os.path.join(ROOT, "configs", "tiny_cpu.py")!r})
        tiny_cpu = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tiny_cpu)


        def get_config(arg=None):
            c = tiny_cpu.get_config("runlocal,objective=contrastive,evals=0,steps={STEPS},data_dir={emoji.root}")
            c.data.prepare = ""
            c.data.datasets = [dict(name="emoji_i2t", path={str(rows)!r}, image_root={str(emoji.root)!r})]
            c.data.on_bad_row, c.data.max_skip_fraction = "skip", 0.5
            c.model.overrides["text"]["num_hidden_layers"] = 1
            c.model.overrides["vision"]["depth"] = 1
            c.checkpoint.every, c.checkpoint.keep = 1, 2
            c.progress = False
            return c
        """))
    return str(path)


def _cmd(config_file, workdir, *overrides):
    return [sys.executable, "-m", "btoks_jax.cli", "train", "--config", config_file, "--workdir", str(workdir),
            *overrides]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _run(config_file, workdir, *overrides, check=True):
    t0 = time.monotonic()
    r = subprocess.run(_cmd(config_file, workdir, *overrides), env=_env(), capture_output=True, text=True,
                       timeout=HANG_S)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r, time.monotonic() - t0


@pytest.fixture(scope="module")
def reference(run_config, tmp_path_factory):
    """The uninterrupted run: its workdir, losses and skip counts by step, and how long it took."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    _, seconds = _run(run_config, workdir)
    rows = U.loss_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return workdir, {r["step"]: r["loss"] for r in rows}, {r["step"]: r["skipped_rows"] for r in rows}, seconds


# ===================================== bad rows =====================================


CFG = tiny_config()
PIPE = PipelineConfig(global_batch_size=8, subbatch_size=8, buckets=((32, 64),), target_len=0,
                      image_min_pixels=28 * 28, image_max_pixels=28 * 28 * 9, num_threads=2, prefetch_batches=1)


def test_skipped_rows_are_replaced_deterministically_and_counted(emoji, tokenizer, tmp_path, caplog):
    good = DatasetSpec("i2t", str(emoji.train["emoji_i2t"]), image_root=str(emoji.root))
    fail = TrainBatchIterator([good], PIPE, CFG, tokenizer)
    skip = TrainBatchIterator([good], dataclasses.replace(PIPE, on_bad_row="skip"), CFG, tokenizer)
    for _ in range(3):  # without bad rows, "skip" gives the batches of "fail", bit for bit
        U.assert_same_batches(next(fail), next(skip))
    assert skip.skipped_rows == 0 and skip.rows_read == 24
    fail.close(), skip.close()

    path, length = _rows_with_a_broken_image(emoji, tmp_path / "bad.jsonl")
    bad = DatasetSpec("i2t", str(path), image_root=str(emoji.root))
    skip = TrainBatchIterator([bad], dataclasses.replace(PIPE, on_bad_row="skip"), CFG, tokenizer)
    batches = [next(skip) for _ in range(6)]  # more than one epoch: every row is used at least once
    assert all(2 not in b.row_ids.tolist() for b in batches)
    hits = [(b.step, message) for b in batches for message in b.skipped]
    assert len(hits) == skip.skipped_rows >= 1 and skip.rows_read == 6 * 8 + skip.skipped_rows
    assert all(m.startswith(f"{path}: row 3: field 'qry_image_path': cannot read image") for _, m in hits)
    assert "skipping a bad row" in caplog.text and "bad.jsonl: row 3: field 'qry_image_path'" in caplog.text
    # The replacement is the next row of the data set's sample order: where the bad row sat, that row is.
    step = hits[0][0]
    schedule = skip.schedule
    for slot in range(8):
        if schedule.locate(step, slot) == (0, 2):
            assert batches[step].row_ids[slot] == schedule.locate(step, slot, offset=1)[1]
    # A restored iterator reads the same batches and continues the counts.
    state = json.loads(json.dumps(skip.get_state()))  # as a checkpoint stores it
    expected = [next(skip) for _ in range(3)]
    resumed = TrainBatchIterator([bad], dataclasses.replace(PIPE, on_bad_row="skip"), CFG, tokenizer)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        U.assert_same_batches(got, want)
        assert got.skipped == want.skipped
    assert (resumed.skipped_rows, resumed.rows_read) == (skip.skipped_rows, skip.rows_read)
    skip.close(), resumed.close()

    # "fail" stops at the row with the reader's message.
    failing = TrainBatchIterator([bad], PIPE, CFG, tokenizer)
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 3: field 'qry_image_path': cannot read image"):
        for _ in range(6):
            next(failing)
    failing.close()
    assert length > 8


def test_too_many_skipped_rows_stop_after_the_minimum_count(emoji, tokenizer, tmp_path):
    rows = [json.loads(line) for line in emoji.train["emoji_i2t"].read_text().splitlines()][:10]
    (emoji.root / "images" / "broken.png").write_bytes(b"not a png at all")
    rows[4] = {**rows[4], "qry_image_path": "images/broken.png"}  # 1 row in 10 is bad
    path = tmp_path / "tenth.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DatasetSpec("tenth", str(path), image_root=str(emoji.root))
    config = dataclasses.replace(PIPE, on_bad_row="skip", max_skip_fraction=0.05)
    iterator = TrainBatchIterator([spec], config, CFG, tokenizer)
    with pytest.raises(BadRowsError, match=r"of the \d+ rows read so far could not be used .*over "
                                           r"data\.max_skip_fraction=0\.05\); the last: .*tenth\.jsonl: row 5"):
        for _ in range(20):
            next(iterator)
            assert iterator.rows_read < 100 + 8 + 8, "the limit applies once 100 rows were read"
    assert iterator.rows_read >= 100  # not before: an early skip alone does not stop a run
    iterator.close()


# ===================================== bad numbers =====================================


def test_nonfinite_steps_are_not_applied_and_stop_the_run(run_config, tmp_path):
    """A temperature of 0 makes every contrastive loss NaN: no update is applied (the step-0 checkpoint's state
    equals step 1's), each step is logged with its rows, and 2 in a row stop the run without saving step 2."""
    workdir = tmp_path / "nan"
    r, _ = _run(run_config, workdir, "--config.step.temperature=0", "--config.train.max_nonfinite_steps=2",
                "--config.checkpoint.save_initial=True", check=False)
    assert r.returncode != 0
    assert "NonFiniteError" in r.stderr and "steps 1..2 all had a non-finite loss" in r.stderr, r.stderr[-3000:]
    assert "the update was not applied" in r.stderr and "emoji_i2t rows [" in r.stderr
    rows = U.loss_rows(workdir)
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["skipped_update"] == 1.0 and math.isnan(row["loss"]) for row in rows)
    mgr = checkpoint.manager(str(workdir), read_only=True, async_save=False)
    assert sorted(mgr.all_steps()) == [0, 1]  # no save of step 2, where the run stopped
    states = [mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state for s in (0, 1)]
    for name in ("params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, states[0][name], states[1][name])
    assert int(states[1]["step"]) == 1  # the batch was consumed: the data moved on


# ===================================== faults =====================================


_FULL_DISK = textwrap.dedent("""\
    import json, os, sys
    import jax.numpy as jnp, numpy as np
    from btoks_jax import checkpoint

    root = sys.argv[1]
    state = {"w": jnp.asarray(np.arange(128 * 256, dtype=np.float32).reshape(128, 256))}
    mgr = checkpoint.manager(root, max_to_keep=3, async_save=True)
    checkpoint.save(mgr, 1, state, {}, {"step": 1}, {"run": 1}, force=True)
    checkpoint.wait(mgr)
    with open(os.path.join(root, "filler"), "wb") as f:  # the file system fills up
        try:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        except OSError:
            pass
    out = {}
    try:
        checkpoint.save(mgr, 2, {"w": state["w"] + 1}, {}, {"step": 2}, {"run": 1}, force=True)
        checkpoint.wait(mgr)
    except checkpoint.CheckpointError as e:
        out["error"] = str(e)
    out["listing"] = sorted(os.listdir(checkpoint.checkpoints_dir(root)))
    os.remove(os.path.join(root, "filler"))
    mgr = checkpoint.manager(root, max_to_keep=3, async_save=False)  # the next run
    out["steps"] = sorted(mgr.all_steps())
    restored = mgr.restore(mgr.latest_step(), args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardRestore(), data=checkpoint.ocp.args.JsonRestore()))
    out["data"], out["same"] = restored.data, bool((np.asarray(restored.state["w"]) == state["w"]).all())
    out["listing_after"] = sorted(os.listdir(checkpoint.checkpoints_dir(root)))
    print(json.dumps(out))
    """)


def test_save_onto_a_full_disk_fails_loudly_and_keeps_the_previous_checkpoint(tmp_path):
    """A real full file system: a 4 MB tmpfs in a private mount namespace (`unshare`, as root or as a user with
    user namespaces), filled up after the first save."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private tmpfs")
    folder = tmp_path / "small"
    folder.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(_FULL_DISK)
    cmd = ["unshare", "--mount", "--map-root-user", "sh", "-c",
           'mount -t tmpfs -o size=4m tmpfs "$1" && exec "$2" "$3" "$1"', "sh", str(folder), sys.executable,
           str(script)]
    if os.geteuid() == 0:
        cmd.remove("--map-root-user")
    r = subprocess.run(cmd, env=dict(_env(), PYTHONPATH=ROOT), capture_output=True, text=True, timeout=HANG_S)
    if r.returncode and "mount" in r.stderr and "btoks_jax" not in r.stderr:
        pytest.skip(f"no private tmpfs here: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "No space left on device" in out["error"] and "saving step 2" in out["error"]
    assert "are kept (steps [1]); a rerun resumes from step 1" in out["error"]
    assert "1" in out["listing"] and "2" not in out["listing"]  # step 2 never became a step
    assert out["steps"] == [1] and out["data"] == {"step": 1} and out["same"]
    assert out["listing_after"] == ["1"]  # the next manager removed the unfinished step


@pytest.mark.xdist_group("resume")
def test_repeated_kills_at_random_points_reproduce_the_uninterrupted_run(run_config, reference, tmp_path):
    """SIGKILL four times at seeded random points: twice as soon as a step's save is under way (a temporary step
    directory exists), twice at a random time of the run (start-up, restore, steps or saves). Each time the run
    resumes; in the end every logged loss and skip count equals the uninterrupted run's, steps logged again after
    a kill included."""
    _, ref_losses, ref_skipped, ref_seconds = reference
    assert ref_skipped[STEPS] >= 1  # the broken image was met and skipped
    rng = random.Random(20240611)
    plan = ["save", "save", "time", "time"]
    rng.shuffle(plan)
    workdir = tmp_path / "killed"
    ckpts = workdir / "checkpoints"
    inside_save = 0
    for kind in plan:
        proc = subprocess.Popen(_cmd(run_config, workdir), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + HANG_S
            kill_at = time.monotonic() + rng.uniform(0.2, 1.0) * ref_seconds
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    pytest.fail(f"the run ended before the kill: {proc.stderr.read()[-3000:]}")
                in_save = [n for n in (os.listdir(ckpts) if ckpts.is_dir() else []) if TMP in n]
                if (kind == "save" and in_save) or (kind == "time" and time.monotonic() >= kill_at):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
            else:
                pytest.fail("the run never reached the point to kill")
            assert proc.wait(timeout=HANG_S) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        inside_save += kind == "save" and any(TMP in n for n in os.listdir(ckpts))
    assert inside_save >= 1, "no kill landed inside a save"
    _run(run_config, workdir)
    rows = U.loss_rows(workdir)
    assert sorted({r["step"] for r in rows}) == list(range(1, STEPS + 1))
    assert not any(TMP in n for n in os.listdir(ckpts))
    for row in rows:
        assert row["loss"] == pytest.approx(ref_losses[row["step"]], rel=1e-6, abs=1e-6), row
        assert row["skipped_rows"] == ref_skipped[row["step"]], row


def test_resume_with_changed_data_or_math_is_refused(run_config, reference, tmp_path):
    """The refusal comes before any array is restored and names every changed key (checkpoint -> now); settings
    that do not change the run may change."""
    workdir = tmp_path / "changed"
    shutil.copytree(reference[0] / "checkpoints", workdir / "checkpoints")
    config = _load(run_config)
    config.data.seed, config.data.global_batch_size, config.data.subbatch_size = 3, 16, 16
    config.step.temperature, config.total_steps = 0.05, 20
    config.data.datasets = [dict(config.data.datasets[0], weight=2.0)]
    config.compilation_cache_dir = "none"
    with pytest.raises(checkpoint.CheckpointError, match="cannot resume from step 8") as err:
        train.train(config, str(workdir))
    message = str(err.value)
    for change in ("data.seed: 0 -> 3", "data.global_batch_size: 8 -> 16", "step.temperature: 0.02 -> 0.05",
                   "total_steps: 8 -> 20", 'data.datasets: [{"format": "mmeb", "name": "emoji_i2t", "ntp_side": '
                   '"positive", "weight": 1.0}] -> [{"format": "mmeb", "name": "emoji_i2t", "ntp_side": "positive", '
                   '"weight": 2.0}]'):
        assert change in message, (change, message)
    _, meta = checkpoint.read_meta(str(workdir))
    model = dict(meta["model_config"], text_config=dict(meta["model_config"]["text_config"], num_hidden_layers=2))
    with pytest.raises(checkpoint.CheckpointError, match=r"model_config\.text_config\.num_hidden_layers: 1 -> 2"):
        train.check_resume(str(workdir), 8, meta, {**meta, "model_config": model})

    # What does not change the batches or the math may change: logging, checkpoint cadence, evaluations, the
    # threads, the bad-row policy, the mesh, where the files live.
    now = json.loads(json.dumps(meta["config"]))
    now.update(log_every=5, progress=True, evals=[{"name": "emoji"}], mesh={"data": 2, "fsdp": 1, "tensor": 1})
    now["checkpoint"] = dict(now["checkpoint"], every=100, keep=5)
    now["data"] = dict(now["data"], num_threads=8, on_bad_row="fail", max_skip_fraction=0.2,
                       datasets=[dict(now["data"]["datasets"][0], path="gs://bucket/i2t.jsonl", image_root="gs://b")])
    now["train"] = {"max_nonfinite_steps": 10}
    assert train.resume_changes(meta["config"], now) == []
    train.check_resume(str(workdir), 8, meta, {**meta, "config": now})


# ===================================== config mistakes =====================================


def _load(config_file, arg=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location("robust_cpu", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_unknown_config_keys_are_refused(run_config, tmp_path, capsys):
    from btoks_jax import cli

    # On the command line ml_collections refuses an override of a key the config does not have, before training.
    try:
        code = cli.main(["train", "--config", run_config, "--workdir", str(tmp_path / "w"), "--config.data.foo=1"])
    except (KeyError, AttributeError) as e:  # what ml_collections raises today
        assert "foo" in str(e)
    else:  # a usage error, should the command turn it into one
        assert code == 2 and "foo" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    # Keys a config file sets are checked by the trainer before anything runs, with the nearest known key.
    config = _load(run_config)
    config.data.on_bad_rows = "skip"
    config.step.temprature = 0.05
    config.totl_steps = 3
    with pytest.raises(ValueError, match=r"unknown config key\(s\): totl_steps \(did you mean total_steps\?\); "
                                         r"data\.on_bad_rows \(did you mean data\.on_bad_row\?\); step\.temprature "):
        train.train(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("change, message", [
    (dict(mesh=dict(data=16, fsdp=1, tensor=1)), r"config\.mesh .*needs 16 devices, 8 available"),
    (dict(mesh=dict(data=2, fsdp=1, tensor=4)), r"num_key_value_heads=2 does not divide .*'kv_heads' \(tensor=4\)"),
    (dict(mesh=dict(data=1, fsdp=1, tensor=8)), r"num_attention_heads=4 does not divide .*'q_heads' \(tensor=8\)"),
    (dict(buckets=((4, 64),), image_min_pixels=28 * 28 * 4),
     r"data\.buckets: bucket \(4, 64\) cannot hold one image at data\.image_min_pixels=3136: that is at least 4 vision "
     r"tokens \+ 2 wrapper tokens \(query_len 4\)"),
    (dict(image_min_pixels=28 * 28 * 32), r"bucket \(32, 64\) cannot hold one image at data\.image_min_pixels=25088: "
                                          r".*128 patches \(patch budget 64\)"),
    (dict(on_bad_row="ignore"), r"on_bad_row must be 'fail' or 'skip', got 'ignore'"),
    (dict(max_nonfinite_steps=0), r"config\.train\.max_nonfinite_steps must be an integer >= 1, got 0"),
    (dict(sharding_rules="fsdp"), r"config\.sharding_rules='fsdp': no such rule set"),
])
def test_impossible_settings_fail_before_anything_compiles(run_config, tmp_path, change, message):
    config = _load(run_config)
    config.compilation_cache_dir = "none"
    for key, value in change.items():
        if key in ("buckets", "image_min_pixels", "on_bad_row"):
            config.data[key] = value
        elif key == "max_nonfinite_steps":
            config.train[key] = value
        else:
            config[key] = value
    with pytest.raises(ValueError, match=message):
        train.train(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # refused before the workdir was made


def test_buckets_must_hold_the_smallest_image():
    check_budgets(PIPE, CFG)
    check_budgets(dataclasses.replace(PIPE, buckets=((2, 0), (32, 64))), CFG)  # a text-only bucket needs no room
    check_budgets(dataclasses.replace(PIPE, buckets=((3, 4), (32, 64))), CFG)  # 1 token + 2 wrapper tokens, 4 patches
    with pytest.raises(ValueError, match=r"bucket \(2, 64\) cannot hold one image"):
        check_budgets(dataclasses.replace(PIPE, buckets=((2, 64), (32, 64))), CFG)


class _Unnamed(nnx.Module):
    def __init__(self):
        self.kernel = nnx.Param(jnp.zeros((8, 4)))  # no sharding_names
        self.scale = nnx.Param(jnp.ones(()))  # a scalar: nothing to split


def test_a_parameter_without_logical_axis_names_is_an_error():
    _, state = nnx.split(nnx.eval_shape(_Unnamed))
    with pytest.raises(ValueError, match=r"kernel: parameter of shape \(8, 4\) has no logical axis names"):
        sharding.state_shardings(state, sharding.make_mesh(2, 2, 2))
