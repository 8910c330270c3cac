"""Runs on gs:// against a real Cloud Storage emulator (tests/gcs_emulator.py): the file-system layer, training
with its data, Hugging Face weights and workdir in a bucket (killed and resumed too), from_pretrained and export
from and to a bucket, every data and evaluation reader on gs:// URLs, `btoks eval` / `btoks embed` with everything
in the bucket, and the input-pipeline benchmark at its smoke size."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
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
def emoji_in_bucket(gcs, tmp_path_factory):
    """The embedded emoji data set (30 concepts) built locally and uploaded to the bucket: (local folder, gs:// URL)."""
    from btoks_jax.data.emoji_dataset import build_emoji_dataset

    local = tmp_path_factory.mktemp("emoji") / "emoji"
    build_emoji_dataset(local, max_concepts=30)
    url = _url("data", uuid.uuid4().hex[:8], "emoji")
    fs.copy_tree(local, url)
    return local, url


STEPS = 4  # checkpoints every 2 steps (tiny_cpu runlocal), the last two kept


def _train_cmd(workdir: str, data_url: str, hf_url: str) -> list[str]:
    """`btoks train` of configs/tiny_cpu.py:runlocal (its evaluation hooks at the end) with data, weights and
    workdir in the bucket; `data.prepare` stays on and finds the data set there."""
    return [sys.executable, "-m", "btoks_jax.cli", "train", "--config",
            os.path.join(ROOT, "configs", "tiny_cpu.py") + f":runlocal,steps={STEPS},data_dir={data_url}",
            "--workdir", workdir, f"--config.model.hf_dir={hf_url}", "--config.progress=False"]


def _train_env(gcs) -> dict[str, str]:
    return dict(os.environ, **gcs.env, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


@pytest.fixture(scope="module")
def trained_in_bucket(gcs, hf_in_bucket, emoji_in_bucket, tmp_path_factory):
    """`btoks train` (configs/tiny_cpu.py:runlocal, STEPS steps, its evaluation hooks) in a subprocess, as a pod
    worker runs it: training data, Hugging Face weights and workdir all in the bucket. Uninterrupted: the reference
    of the kill-and-resume test."""
    root = tmp_path_factory.mktemp("train_gcs")
    workdir = _url("runs", uuid.uuid4().hex[:8])
    cwd = root / "cwd"
    cwd.mkdir()
    r = subprocess.run(_train_cmd(workdir, emoji_in_bucket[1], hf_in_bucket[1]), env=_train_env(gcs), cwd=cwd,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return root, cwd, workdir


def _losses(workdir: str) -> dict[int, list[float]]:
    """{step: [loss, ...]} of a workdir's metrics.jsonl (a step twice when a killed run had logged it)."""
    out: dict[int, list[float]] = {}
    path = fs.join(workdir, "metrics.jsonl")
    if not fs.exists(path):
        return out
    for line in fs.read_text(path).splitlines():  # whole lines only: every append is one PUT of the object
        row = json.loads(line)
        if "loss" in row:
            out.setdefault(row["step"], []).append(row["loss"])
    return out


def test_train_writes_checkpoints_metrics_and_events_to_the_bucket(trained_in_bucket, tmp_path):
    root, cwd, workdir = trained_in_bucket
    assert fs.listdir(workdir) == ["checkpoints", "metrics.jsonl", "tensorboard"]
    assert str(STEPS) in fs.listdir(fs.join(workdir, "checkpoints"))
    rows = [json.loads(line) for line in fs.read_text(fs.join(workdir, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
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


# ============================================================================== a killed run resumes from the bucket

# Orbax marks a step on object storage complete with this object (there is no rename to make it atomic).
COMMIT_OBJECT = "commit_success.txt"


def _committed_steps(workdir: str) -> list[int]:
    folder = fs.join(workdir, "checkpoints")
    if not fs.isdir(folder):
        return []
    return sorted(int(name) for name in fs.listdir(folder)
                  if name.isdigit() and fs.exists(fs.join(folder, name, COMMIT_OBJECT)))


def test_killed_run_resumes_from_the_bucket_with_the_uninterrupted_losses(gcs, trained_in_bucket, emoji_in_bucket,
                                                                          hf_in_bucket, tmp_path):
    """SIGKILL once the step-2 checkpoint is committed and step 3 is logged, then the same command again: it resumes
    from the latest committed checkpoint in the bucket, and every logged loss, including the steps logged twice
    around the kill, equals the uninterrupted run's (the fixture's)."""
    _, cwd, reference_dir = trained_in_bucket
    reference = {step: values[0] for step, values in _losses(reference_dir).items()}
    assert sorted(reference) == list(range(1, STEPS + 1))
    print("uninterrupted losses:", json.dumps(reference))
    workdir = _url("runs", uuid.uuid4().hex[:8])
    cmd, env = _train_cmd(workdir, emoji_in_bucket[1], hf_in_bucket[1]), _train_env(gcs)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 900  # generous: compiling on a loaded two-core machine can take minutes
        try:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"the run ended before the kill (rc {proc.returncode}): {log.read()[-3000:]!r}")
                if 2 in _committed_steps(workdir) and max(_losses(workdir), default=0) >= 3:
                    proc.send_signal(signal.SIGKILL)
                    break
                if time.monotonic() > deadline:
                    pytest.fail("the run never committed the step-2 checkpoint and logged step 3")
                time.sleep(0.1)
            assert proc.wait(timeout=120) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    committed = _committed_steps(workdir)
    assert committed and committed[-1] < STEPS, committed
    logged_before = max(_losses(workdir))
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resumed from step {committed[-1]}" in r.stderr
    resumed = _losses(workdir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    redone = [step for step, values in resumed.items() if len(values) > 1]
    assert redone == list(range(committed[-1] + 1, logged_before + 1))  # the work the kill lost, done again
    for step, values in resumed.items():
        for value in values:
            assert value == pytest.approx(reference[step], rel=1e-6, abs=1e-6), (step, value, reference[step])
    assert str(STEPS) in fs.listdir(fs.join(workdir, "checkpoints"))
    _no_local_gs_folder(cwd, ROOT, tmp_path, os.getcwd())


# ============================================================================== btoks eval / embed, all in the bucket


def test_eval_and_embed_with_model_data_and_outputs_in_the_bucket(trained_in_bucket, emoji_in_bucket, tmp_path):
    """`btoks eval --model gs://RUN --data gs://DATA` writes its scores to gs://RUN/eval_btoks (the default --out);
    `btoks embed` reads rows, images and frame folders from the bucket (the items a local copy gives, with gs://
    paths) and writes the .npy there."""
    from PIL import Image

    from btoks_jax import cli

    _, cwd, workdir = trained_in_bucket
    local_data, data_url = emoji_in_bucket
    assert cli.main(["eval", "--model", workdir, "--data", data_url, "--max-rows", "8", "--batch-size", "16"]) == 0
    out = fs.join(workdir, "eval_btoks")
    assert set(fs.listdir(out)) == {"summary.json", "emoji_i2t_score.json", "emoji_t2i_score.json",
                                    "emoji_cls_score.json"}
    summary = fs.read_json(fs.join(out, "summary.json"))
    assert set(summary["datasets"]) == {"emoji_i2t", "emoji_t2i", "emoji_cls"}
    assert all(0 <= s["hit@1"] <= 1 and 0 < s["num_pred"] <= 8 for s in summary["datasets"].values())

    # Rows with a relative image, a frame folder and a frame list, locally and the same files in the bucket.
    local = tmp_path / "embed"
    (local / "frames").mkdir(parents=True)
    images = sorted((local_data / "images").iterdir())[:3]
    for i, image in enumerate(images):
        Image.open(image).save(local / "frames" / f"frame_{i}.png")
    rows = [{"text": "a grinning face"}, {"image": "frames/frame_0.png", "instruction": "Represent the emoji."},
            {"video": "frames", "text": "an emoji clip"}, {"video": ["frames/frame_2.png", "frames/frame_1.png"]}]
    (local / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    url = _url("embed", uuid.uuid4().hex[:8])
    fs.copy_tree(local, url)
    convert = _on_url(local.resolve(), url)
    assert cli._read_embed_rows(fs.join(url, "rows.jsonl")) == [
        _item_on_url(item, convert) for item in cli._read_embed_rows(str(local / "rows.jsonl"))]
    assert cli.main(["embed", "--model", workdir, "--input", fs.join(url, "rows.jsonl"),
                     "--output", fs.join(url, "vectors.npy")]) == 0
    vectors = np.load(io.BytesIO(fs.read_bytes(fs.join(url, "vectors.npy"))))  # pixels as local: see the reader test
    assert vectors.shape == (len(rows), 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert len({row.tobytes() for row in vectors}) == len(rows)
    assert sorted(fs.listdir(url)) == ["frames", "rows.jsonl", "vectors.npy"]
    _no_local_gs_folder(cwd, ROOT, tmp_path, os.getcwd())


# ============================================================================== the data and evaluation readers


def _on_url(local_root, url: str):
    """Maps a local path string under `local_root` to the same place under `url` (the uploaded copy)."""
    prefix = str(local_root)

    def convert(path):
        if path is None:
            return None
        assert str(path).startswith(prefix), (path, prefix)
        return url + str(path)[len(prefix):].replace(os.sep, "/")

    return convert


def _item_on_url(item, convert):
    import dataclasses

    if item is None:
        return None
    video = None if item.video is None else tuple(convert(frame) for frame in item.video)
    return dataclasses.replace(item, image=convert(item.image), video=video)


def _train_row_on_url(row, convert):
    import dataclasses

    sides = {name: _item_on_url(getattr(row, name), convert) for name in ("query", "positive", "negative")}
    local_file = row.source.split(": row ")[0]
    return dataclasses.replace(row, **sides, source=row.source.replace(local_file, convert(local_file)))


def test_training_and_evaluation_readers_take_gs_urls(emoji_in_bucket, hf_in_bucket, tokenizer, tmp_path):
    """Each reader gives on the bucket's copy what it gives locally, with gs:// paths: MMEB-train JSONL, parquet and
    globs, frame folders and lists, the prepared-style check, images, evaluation rows, folder discovery, score files,
    processor configs, tokenizer files and a Hugging Face config.json; errors name the gs:// URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from btoks_jax.data.media import frame_paths
    from btoks_jax.data.mmeb_train import decode_image, read_mmeb_train, source_files
    from btoks_jax.evaluate import mmeb, run
    from btoks_jax.model_config import from_hf_config
    from btoks_jax.processing import ImageProcessor, VideoProcessor, load_image, load_tokenizer, save_tokenizer

    local, url = emoji_in_bucket
    convert = _on_url(local, url)
    for task in ("emoji_i2t", "emoji_t2i", "emoji_cls"):
        nearby = read_mmeb_train(local / f"{task}_train.jsonl")
        remote = read_mmeb_train(fs.join(url, f"{task}_train.jsonl"))  # media relative to the file's folder
        assert remote == [_train_row_on_url(row, convert) for row in nearby] and remote
        assert read_mmeb_train(fs.join(url, f"{task}_train.jsonl"), image_root=url) == remote
    assert source_files(fs.join(url, "emoji_*_train.jsonl")) == [fs.join(url, f"emoji_{t}_train.jsonl")
                                                                 for t in ("cls", "i2t", "t2i")]
    assert len(read_mmeb_train(fs.join(url, "emoji_*_train.jsonl"))) == sum(
        len(read_mmeb_train(local / f"{t}_train.jsonl")) for t in ("emoji_i2t", "emoji_t2i", "emoji_cls"))

    # Parquet shards in their own folder, media under another root in the bucket.
    records = [json.loads(line) for line in (local / "emoji_i2t_train.jsonl").read_text().splitlines()]
    shards = _url("data", uuid.uuid4().hex[:8], "shards")
    for i, part in enumerate((records[::2], records[1::2])):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part), buffer)
        fs.write_bytes(fs.join(shards, f"part-{i}.parquet"), buffer.getvalue())
    from_parquet = read_mmeb_train(fs.join(shards, "part-*.parquet"), image_root=url)
    assert sorted(r.query.image for r in from_parquet) == sorted(fs.join(url, r["qry_image_path"]) for r in records)

    # A missing image names its URL; a prepared file in the other prompt style is refused.
    broken = fs.join(shards, "broken.jsonl")
    fs.write_text(broken, json.dumps({**records[0], "qry_image_path": "images/none.png"}) + "\n")
    with pytest.raises(ValueError, match=f"{broken}: row 1: field 'qry_image_path': image file not found: "
                                         f"{shards}/images/none.png"):
        read_mmeb_train(broken)
    styled = _url("data", uuid.uuid4().hex[:8], "prepared")
    fs.write_text(fs.join(styled, "set.jsonl"), json.dumps({**records[0], "qry_image_path": ""}) + "\n")
    fs.write_text(fs.join(styled, "manifest.json"),
                  json.dumps({"datasets": {"set": {"file": "set.jsonl", "prompt_style": "vlm2vec"}}}))
    with pytest.raises(ValueError, match="prepared in prompt style 'vlm2vec'"):
        read_mmeb_train(fs.join(styled, "set.jsonl"), prompt_style="btoks")

    # Frames: a folder in natural order, and a list; pixels as from the local files.
    frames = _url("data", uuid.uuid4().hex[:8], "video")
    image = sorted((local / "images").iterdir())[0]
    for name in ("frame_10.png", "frame_9.png", "frame_100.png", "notes.txt"):
        fs.copy(image, fs.join(frames, "v", name))
    assert frame_paths("v", frames) == tuple(fs.join(frames, "v", n)
                                             for n in ("frame_9.png", "frame_10.png", "frame_100.png"))
    assert frame_paths(["v/frame_9.png"], frames) == (fs.join(frames, "v", "frame_9.png"),)
    with pytest.raises(ValueError, match=f"frame file not found: {frames}/v/none.png"):
        frame_paths(["v/none.png"], frames)
    with pytest.raises(ValueError, match=f"not found: {frames}/w"):
        frame_paths("w", frames)
    assert np.array_equal(load_image(fs.join(frames, "v", "frame_9.png")), load_image(image))
    assert np.array_equal(decode_image(fs.join(frames, "v", "frame_9.png")), load_image(image))

    # Evaluation rows, folder discovery, score files and the summary.
    for task in ("emoji_i2t", "emoji_t2i", "emoji_cls"):
        nearby = mmeb.read_eval_rows(local / f"{task}_test.jsonl")
        remote = mmeb.read_eval_rows(fs.join(url, f"{task}_test.jsonl"))
        assert remote == [mmeb.EvalRow(_item_on_url(r.query, convert),
                                       tuple(_item_on_url(c, convert) for c in r.candidates), r.relevance)
                          for r in nearby]
    found = run.discover(url)
    assert list(found) == list(run.discover(local)) and found["emoji_i2t"] == fs.join(url, "emoji_i2t_test.jsonl")
    scores = _url("scores", uuid.uuid4().hex[:8])
    assert mmeb.write_score_file(fs.join(scores, "image"), "ImageNet-1K", {"hit@1": 0.5}) == \
        fs.join(scores, "image", "ImageNet-1K_score.json")
    mmeb.write_score_file(scores, "emoji_i2t", {"hit@1": 0.25})
    assert mmeb.load_score_files(scores) == {"ImageNet-1K": {"hit@1": 0.5}, "emoji_i2t": {"hit@1": 0.25}}
    mmeb.write_summary(fs.join(scores, "summary.json"), mmeb.summarize(mmeb.load_score_files(scores)))
    assert fs.read_json(fs.join(scores, "summary.json"))["extra_datasets"]["emoji_i2t"]["score"] == 0.25

    # Processor settings and a model's config.json in the bucket.
    settings = _url("settings", uuid.uuid4().hex[:8])
    ImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(settings)
    VideoProcessor(num_frames=4).save_pretrained(settings)
    assert ImageProcessor.from_pretrained(settings) == ImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    assert VideoProcessor.from_pretrained(settings) == VideoProcessor(num_frames=4)
    save_tokenizer(tokenizer, settings)  # written locally by transformers, then copied
    assert "tokenizer.json" in fs.listdir(settings)
    assert load_tokenizer(settings).get_vocab() == tokenizer.get_vocab()
    assert from_hf_config(hf_in_bucket[1]) == from_hf_config(hf_in_bucket[0])
    _no_local_gs_folder(os.getcwd(), tmp_path, local)


def _tiny_pipeline(**overrides):
    from btoks_jax.data.pipeline import PipelineConfig

    # Emoji images are 72x72: at these pixel bounds each becomes 84x84, 9 vision tokens and 36 patches.
    settings = dict(global_batch_size=8, subbatch_size=4, buckets=((32, 0), (64, 64)), target_len=24,
                    image_min_pixels=28 * 28 * 4, image_max_pixels=28 * 28 * 9, num_threads=4, prefetch_batches=1)
    return PipelineConfig(**{**settings, **overrides})


def _same_batches(a, b) -> None:
    import jax

    assert a.query.layout == b.query.layout and a.positive.layout == b.positive.layout
    assert np.array_equal(a.dataset_ids, b.dataset_ids) and np.array_equal(a.row_ids, b.row_ids)
    for x, y in zip(jax.tree.leaves((a.query.inputs, a.positive.inputs, a.query.labels, a.positive.labels)),
                    jax.tree.leaves((b.query.inputs, b.positive.inputs, b.query.labels, b.positive.labels))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_each_process_reads_only_its_rows_from_the_bucket(gcs, tokenizer, tmp_path):
    """Two processes of a pod over one data set in the bucket: each one's batches equal those from a local copy, and
    a process reads only the images of its own rows. The images that only process 1's first batches use are
    deleted from the bucket after both opened the data set: process 0 runs on, process 1 fails naming one."""
    from PIL import Image

    from btoks_jax.data.mmeb_train import DatasetSpec
    from btoks_jax.data.pipeline import TrainBatchIterator
    from btoks_jax.model_config import tiny_config

    local = tmp_path / "set"
    (local / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(160):  # one image per row, so every row's image is its own object
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(local / "img" / f"{i:03d}.png")
        rows.append({"qry": "<|image_1|>\nDescribe the pattern.", "qry_image_path": f"img/{i:03d}.png",
                     "pos_text": f"pattern number {i}", "pos_image_path": ""})
    (local / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    url = _url("shard", uuid.uuid4().hex[:8])
    fs.copy_tree(local, url)
    config, model = _tiny_pipeline(), tiny_config()

    def iterator(root, index):
        return TrainBatchIterator([DatasetSpec("set", fs.join(root, "train.jsonl"))], config, model, tokenizer,
                                  process_index=index, process_count=2, agree=lambda needs: needs)

    def images(it, steps):
        return {it._loader.sources[0][it.schedule.locate(step, it.process_index * it.local_batch + slot)[1]].query.image
                for step in steps for slot in range(it.local_batch)}

    nearby, remote = [iterator(str(local), 0)], [iterator(url, i) for i in (0, 1)]
    try:
        only_1 = images(remote[1], range(2)) - images(remote[0], range(6))  # 0's reads, prefetch included
        first_1 = images(remote[1], range(1)) & only_1
        assert first_1, "the two processes' first rows share every image"
        for path in only_1:
            fs.remove(path)
        for _ in range(2):
            _same_batches(next(remote[0]), next(nearby[0]))
        with pytest.raises(ValueError, match=r"cannot read image gs://.*/img/\d{3}\.png"):
            next(remote[1])
    finally:
        for it in (*nearby, *remote):
            it.close()


def test_tfds_array_record_data_read_from_the_bucket(gcs, emoji_in_bucket, tokenizer, tmp_path):
    """An ArrayRecord copy (`build_tfds`) uploaded to the bucket reads straight from gs:// (tfds reads its metadata
    through gcsfs, array_record the records with its own Cloud Storage client), as `DatasetSpec(format="tfds")`."""
    from btoks_jax.data import tfds_mmeb
    from btoks_jax.data.mmeb_train import DatasetSpec
    from btoks_jax.data.pipeline import TrainBatchIterator
    from btoks_jax.model_config import tiny_config

    local, url = emoji_in_bucket
    built = tmp_path / "tfds"
    tfds_mmeb.build_tfds(fs.join(url, "emoji_i2t_train.jsonl"), "emoji_i2t", built)  # media read from the bucket
    remote = _url("tfds", uuid.uuid4().hex[:8])
    fs.copy_tree(built, remote)
    stored, nearby = tfds_mmeb.read_tfds(remote, "emoji_i2t"), tfds_mmeb.read_tfds(built, "emoji_i2t")
    assert len(stored) == len(nearby) == len(fs.read_text(fs.join(url, "emoji_i2t_train.jsonl")).splitlines())
    assert [stored[i] for i in range(len(stored))] == [nearby[i] for i in range(len(nearby))]
    from btoks_jax.data.mmeb_train import read_mmeb_train

    first = read_mmeb_train(local / "emoji_i2t_train.jsonl")[0]  # record i is row i of the source
    assert stored[0].query.image == open(first.query.image, "rb").read()
    config, model = _tiny_pipeline(global_batch_size=4, subbatch_size=4), tiny_config()
    a = TrainBatchIterator([DatasetSpec("emoji_i2t", remote, format="tfds")], config, model, tokenizer)
    b = TrainBatchIterator([DatasetSpec("emoji_i2t", str(built), format="tfds")], config, model, tokenizer)
    try:
        for _ in range(2):
            _same_batches(next(a), next(b))
    finally:
        a.close()
        b.close()
    _no_local_gs_folder(os.getcwd(), tmp_path)


def _content_embedding(items) -> np.ndarray:
    """A stand-in embedder that reads what a model would: each item's text and the bytes of its image / frames
    (through `file_digest`, local or gs://), hashed into a unit vector; equal content, equal vector."""
    import hashlib

    from btoks_jax.evaluate.store import file_digest

    out = []
    for item in items:
        media = [file_digest(p) for p in ((item.image,) if item.image else ()) + tuple(item.video or ())]
        seed = hashlib.sha256("\0".join([item.instruction, item.text, *media]).encode()).digest()
        vector = np.random.default_rng(list(seed)).normal(size=16)
        out.append(vector / np.linalg.norm(vector))
    return np.asarray(out, np.float32)


def test_published_mmeb_v2_sets_read_and_scored_from_the_bucket(gcs, tmp_path):
    """The MMEB-V2 readers on the published layouts' miniatures uploaded to the bucket give the local items with
    gs:// paths (document pages extracted into a gs:// media folder), and `evaluate_mmeb_v2` with root, scores,
    pages and embedding store all in the bucket scores as locally, then reuses its score files."""
    from mmeb_fixtures import image, video, visdoc

    from btoks_jax.evaluate import mmeb, published
    from btoks_jax.evaluate.run import evaluate_mmeb_v2
    from btoks_jax.evaluate.store import EmbeddingStore

    local = tmp_path / "mmeb_v2"
    for fixture in (image, video, visdoc):
        fixture.write(local)
    url = _url("mmeb_v2", uuid.uuid4().hex[:8])
    fs.copy_tree(local, url)
    convert = _on_url(local, url)
    loaders = published.loaders()
    # One set per reader and layout (image parsers, video classification / retrieval / QA / moments, ViDoRe and
    # VisRAG pages); all 78 take about 9 s here, each reading a handful of objects.
    for name in ("ImageNet-1K", "MSCOCO_t2i", "CIRR", "K700", "SmthSmthV2", "MSR-VTT", "MVBench", "Video-MME",
                 "QVHighlight", "MomentSeeker", "ViDoRe_arxivqa", "VisRAG_ChartQA", "MMLongBench-doc"):
        load = loaders[name]
        nearby, remote = load(local, "btoks", local / "media"), load(url, "btoks", fs.join(url, "media"))
        assert remote.rows == [mmeb.EvalRow(_item_on_url(r.query, convert),
                                            tuple(_item_on_url(c, convert) for c in r.candidates), r.relevance)
                               for r in nearby.rows], name
        assert remote.corpus == tuple(_item_on_url(c, convert) for c in nearby.corpus), name
    page = next(c.image for c in loaders["ViDoRe_arxivqa"](url, "btoks", fs.join(url, "media")).corpus)
    assert page.startswith(fs.join(url, "media", "ViDoRe_arxivqa") + "/")

    names = ["ImageNet-1K", "MSCOCO_t2i", "K700", "QVHighlight", "MomentSeeker", "ViDoRe_arxivqa", "VisRAG_ChartQA"]
    outs = {}
    for where, root in (("local", str(local)), ("gcs", url)):
        out = fs.join(root, "scores")
        store = EmbeddingStore(fs.join(root, "store"), "content-hash")
        outs[where] = evaluate_mmeb_v2(_content_embedding, root, out, style="btoks", media_dir=fs.join(root, "pages"),
                                       store=store, datasets=names, progress=False, log=lambda _: None)
    assert outs["gcs"]["meta_tasks"] == outs["local"]["meta_tasks"] and outs["gcs"]["missing"] == {}
    scores = fs.join(url, "scores")
    assert {"summary.json", "btoks-jax.json", "image", "video", "visdoc"} <= set(fs.listdir(scores))
    assert mmeb.load_score_files(scores) == mmeb.load_score_files(local / "scores")
    [shards] = [fs.listdir(fs.join(url, "store", d)) for d in fs.listdir(fs.join(url, "store"))]
    assert "namespace.txt" in shards and any(n.startswith("part-") and n.endswith(".npz") for n in shards)
    said = []
    evaluate_mmeb_v2(_content_embedding, url, scores, style="btoks", media_dir=fs.join(url, "pages"),
                     store=EmbeddingStore(fs.join(url, "store"), "content-hash"), datasets=names, progress=False,
                     log=said.append)
    assert said == [f"{n}: reusing {fs.join(scores, mmeb.MMEB_V2_BY_NAME[n].modality, n + '_score.json')}"
                    for n in names]
    _no_local_gs_folder(os.getcwd(), tmp_path, local)


# ============================================================================== the input-pipeline benchmark


def test_input_pipeline_benchmark_tiny(tmp_path):
    """benchmarks/input_pipeline_gcs.py --tiny (its own emulator, in a subprocess): both sources give the same
    batches (the script checks every one) and the record holds the side-by-side figures."""
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "input_pipeline_gcs.py"), "--tiny",
                        "--threads", "2", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-4000:]
    record = json.loads(out.read_text())
    assert record["benchmark"] == "input_pipeline_gcs" and record["tiny"] is True
    [run] = record["runs"]
    assert run["threads"] == 2 and run["gcs_over_local_rows_per_s"] > 0
    assert all(run[source]["rows_per_s"] > 0 for source in ("local", "gcs"))
    assert "gcs / local; batches identical" in r.stdout
    _no_local_gs_folder(tmp_path, os.getcwd())
