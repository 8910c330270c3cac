"""Runs on gs:// against a real Cloud Storage emulator (tests/gcs_emulator.py): the file-system layer, training
with its workdir in a bucket, from_pretrained and export from and to a bucket, Hugging Face weights in a bucket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from gcs_emulator import BUCKET, running_emulator

from btoks_jax import fs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _url(*parts: str) -> str:
    return "/".join([f"gs://{BUCKET}", *parts])


def _no_local_gs_folder(*folders) -> None:
    """A URL mistaken for a local path shows up as a folder `gs:` (os.path turns gs://b/x into gs:/b/x)."""
    for folder in folders:
        assert not os.path.exists(os.path.join(folder, "gs:")), f"a local gs: folder appeared in {folder}"


@pytest.fixture(scope="session")
def gcs():
    """One emulator for this file (tests/gcs_emulator.py), every client of this process pointed at it."""
    with running_emulator() as emulator:
        yield emulator


# ============================================================================== the file-system layer


def test_fs_files_folders_and_listings(gcs, tmp_path):
    base = _url("fs", uuid.uuid4().hex[:8])
    assert fs.is_remote(base) and not fs.is_remote(str(tmp_path)) and not fs.is_remote("relative/path")
    assert fs.join(base, "a", "b.txt") == base + "/a/b.txt"
    assert fs.basename(base + "/run/") == "run" and fs.dirname(base + "/run") == base
    assert not fs.exists(base) and not fs.isdir(base)
    fs.makedirs(base)  # nothing to create on object storage
    fs.write_text(fs.join(base, "a", "b.txt"), "héllo")
    fs.write_bytes(fs.join(base, "a", "c.bin"), bytes(range(256)))
    fs.write_text_atomic(fs.join(base, "top.json"), json.dumps({"x": 1}))
    assert fs.isdir(base) and fs.isdir(fs.join(base, "a")) and fs.isfile(fs.join(base, "a", "b.txt"))
    assert fs.listdir(base) == ["a", "top.json"] and fs.listdir(fs.join(base, "a")) == ["b.txt", "c.bin"]
    assert fs.glob(fs.join(base, "a", "*.txt")) == [base + "/a/b.txt"]
    assert fs.walk_files(base) == ["a/b.txt", "a/c.bin", "top.json"]
    assert fs.read_text(fs.join(base, "a", "b.txt")) == "héllo" and fs.read_json(fs.join(base, "top.json")) == {"x": 1}
    assert fs.size(fs.join(base, "a", "c.bin")) == 256
    with fs.open(fs.join(base, "a", "c.bin"), "rb", cache_type="none") as f:  # ranged reads
        f.seek(100)
        assert f.read(3) == bytes([100, 101, 102])
    with fs.open(fs.join(base, "a", "b.txt")) as f:
        assert f.read() == "héllo"
    with pytest.raises(FileNotFoundError):
        fs.listdir(fs.join(base, "nothing"))
    with pytest.raises(NotADirectoryError):
        fs.listdir(fs.join(base, "top.json"))
    # Copies in every direction, and local copies of small files.
    local = tmp_path / "copy.bin"
    fs.copy(fs.join(base, "a", "c.bin"), local)
    fs.copy(local, fs.join(base, "up.bin"))
    fs.copy(fs.join(base, "up.bin"), fs.join(base, "server_side.bin"))
    assert fs.read_bytes(fs.join(base, "server_side.bin")) == bytes(range(256))
    with fs.local_copy(fs.join(base, "a"), ["b.txt", "missing.json"]) as folder:
        assert sorted(os.listdir(folder)) == ["b.txt"]
    fs.rmtree(fs.join(base, "a"))
    assert not fs.exists(fs.join(base, "a", "b.txt")) and "a" not in fs.listdir(base)
    _no_local_gs_folder(os.getcwd(), tmp_path)


def test_fs_large_write_is_a_resumable_upload(gcs):
    data = np.random.default_rng(0).integers(0, 256, 3 * 2**20 + 12345, dtype=np.uint8).tobytes()
    target = _url("fs", "large.bin")
    with fs.open(target, "wb", block_size=2**20) as f:  # blocks of 1 MiB: the upload goes in several parts
        for start in range(0, len(data), 300_000):
            f.write(data[start:start + 300_000])
    assert fs.size(target) == len(data) and fs.read_bytes(target) == data


def test_fs_line_log_and_publish_dir(gcs, tmp_path):
    base = _url("fs", uuid.uuid4().hex[:8])
    log_path = fs.join(base, "metrics.jsonl")
    log = fs.LineLog(log_path)
    log.append_json({"step": 1})
    log.append_json({"step": 2})
    assert fs.read_text(log_path) == '{"step": 1}\n{"step": 2}\n'
    fs.LineLog(log_path).append_json({"step": 3})  # a resumed writer keeps the lines before
    fs.append_line(log_path, '{"step": 4}')
    assert [json.loads(line)["step"] for line in fs.read_text(log_path).splitlines()] == [1, 2, 3, 4]
    # Local logs append as before.
    local = tmp_path / "metrics.jsonl"
    fs.LineLog(local).append_json({"step": 1})
    fs.LineLog(local).append_json({"step": 2})
    assert local.read_text() == '{"step": 1}\n{"step": 2}\n'

    # publish_dir over an existing directory: new files in, stale ones out, `last` (config.json) written last.
    out = fs.join(base, "model")
    for name, text in (("config.json", "old"), ("stale.txt", "x"), ("weights.bin", "old")):
        fs.write_text(fs.join(out, name), text)
    staged = fs.staging_dir(out)
    assert fs.dirname(staged) == base and fs.basename(staged).startswith(".model.partial-")
    for name, text in (("config.json", "new"), ("weights.bin", "new"), ("sub/extra.txt", "e")):
        fs.write_text(fs.join(staged, *name.split("/")), text)
    fs.publish_dir(staged, out, last=("config.json",))
    assert fs.walk_files(out) == ["config.json", "sub/extra.txt", "weights.bin"]
    assert fs.read_text(fs.join(out, "config.json")) == "new" and not fs.exists(staged)
    # The local version of the same.
    local_out = tmp_path / "model"
    local_out.mkdir()
    (local_out / "stale.txt").write_text("x")
    staged = fs.staging_dir(local_out)
    fs.write_text(os.path.join(staged, "config.json"), "new")
    fs.publish_dir(staged, local_out, last=("config.json",))
    assert os.listdir(local_out) == ["config.json"] and not os.path.exists(staged)


# ============================================================================== Hugging Face weights in a bucket


def _tiny_cpu_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_cpu", os.path.join(ROOT, "configs", "tiny_cpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("runlocal")


@pytest.fixture(scope="module")
def hf_in_bucket(gcs, tmp_path_factory):
    """A tiny random Qwen2-VL (the architecture of configs/tiny_cpu.py) saved by transformers, with the Qwen2
    tokenizer and processor settings, locally and uploaded to the bucket: (local folder, gs:// URL)."""
    import hf_utils

    from btoks_jax import build
    from btoks_jax.processing import ImageProcessor, VideoProcessor, load_tokenizer
    from btoks_jax.processing.tokenizer import save_tokenizer

    local = tmp_path_factory.mktemp("hf") / "tiny"
    cfg = build.model_config(_tiny_cpu_config().model.to_dict())
    hf_utils.hf_model(cfg, seed=7).save_pretrained(local)
    save_tokenizer(load_tokenizer(), local)
    ImageProcessor(min_pixels=28 * 28, max_pixels=84 * 84).save_pretrained(local)
    VideoProcessor().save_pretrained(local)
    url = _url("models", uuid.uuid4().hex[:8], "tiny")
    copied = fs.copy_tree(local, url)
    assert {"model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(copied)
    return str(local), url


TEXTS = ["a grinning face", "the flag of a country", "a red apple"]


def test_hf_weights_read_from_the_bucket(hf_in_bucket):
    import btoks_jax
    from btoks_jax.convert.safetensors_io import load_tensor, read_header

    local, url = hf_in_bucket
    header = read_header(fs.join(url, "model.safetensors"))  # the header, then one ranged read per tensor
    assert header == read_header(os.path.join(local, "model.safetensors"))
    key = next(k for k in header if header[k]["dtype"] == "F32" and len(header[k]["shape"]) == 2)
    assert np.array_equal(load_tensor(fs.join(url, "model.safetensors"), key),
                          load_tensor(os.path.join(local, "model.safetensors"), key))
    remote = btoks_jax.from_pretrained(url, num_btoks=4, shard=False)
    nearby = btoks_jax.from_pretrained(local, num_btoks=4, shard=False)
    assert len(remote.processor.tokenizer) == len(nearby.processor.tokenizer)
    assert np.array_equal(remote.embed(TEXTS), nearby.embed(TEXTS))


# ============================================================================== training, from_pretrained and export


@pytest.fixture(scope="module")
def trained_in_bucket(gcs, hf_in_bucket, tmp_path_factory):
    """`btoks train` (configs/tiny_cpu.py:runlocal, 2 steps, its evaluation hooks) in a subprocess, as a pod worker
    runs it: workdir and Hugging Face weights in the bucket, training data local."""
    from btoks_jax.data.emoji_dataset import build_emoji_dataset

    root = tmp_path_factory.mktemp("train_gcs")
    data = root / "data"
    build_emoji_dataset(data, max_concepts=30)
    workdir = _url("runs", uuid.uuid4().hex[:8])
    cwd = root / "cwd"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "btoks_jax.cli", "train", "--config",
           os.path.join(ROOT, "configs", "tiny_cpu.py") + f":runlocal,steps=2,data_dir={data}",
           "--workdir", workdir, f"--config.model.hf_dir={hf_in_bucket[1]}", "--config.progress=False",
           "--config.data.prepare="]
    env = dict(os.environ, **gcs.env, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return root, cwd, workdir


def test_train_writes_checkpoints_metrics_and_events_to_the_bucket(trained_in_bucket, tmp_path):
    root, cwd, workdir = trained_in_bucket
    assert fs.listdir(workdir) == ["checkpoints", "metrics.jsonl", "tensorboard"]
    assert "2" in fs.listdir(fs.join(workdir, "checkpoints"))
    rows = [json.loads(line) for line in fs.read_text(fs.join(workdir, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    evals = {r["eval"]: r for r in rows if "eval" in r}
    assert set(evals) == {"emoji", "train_pairs"} and all(0 <= r["mean_hit@1"] <= 1 for r in evals.values())
    [events] = fs.listdir(fs.join(workdir, "tensorboard"))
    assert events.startswith("events.out.tfevents.")
    data = fs.read_bytes(fs.join(workdir, "tensorboard", events))
    assert b"train/loss" in data and b"eval/emoji/mean_hit_at_1" in data
    _no_local_gs_folder(cwd, root, ROOT, tmp_path, os.getcwd())


def test_from_pretrained_and_export_between_buckets_agree(trained_in_bucket, tmp_path):
    import transformers

    import btoks_jax
    from btoks_jax import cli
    from btoks_jax.api import EXPORT_SETTINGS

    _, _, workdir = trained_in_bucket
    from_run = btoks_jax.from_pretrained(workdir).embed(TEXTS)
    assert from_run.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(from_run, axis=1), 1.0, atol=1e-5)

    out = workdir + "-export"
    assert cli.main(["export", "--checkpoint", workdir, "--out", out]) == 0
    names = fs.listdir(out)
    assert {"config.json", "model.safetensors", "tokenizer.json", EXPORT_SETTINGS} <= set(names)
    assert not [n for n in fs.listdir(fs.dirname(out)) if ".partial-" in n]  # the staging prefix is gone
    from_export = btoks_jax.from_pretrained(out).embed(TEXTS)

    local = tmp_path / "export"
    fs.copy_tree(out, local)
    hf, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(local, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    from_copy = btoks_jax.from_pretrained(str(local)).embed(TEXTS)
    assert np.array_equal(from_export, from_copy)
    np.testing.assert_allclose(from_export, from_run, atol=1e-5)
    _no_local_gs_folder(tmp_path, os.getcwd())
