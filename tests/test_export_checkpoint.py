"""`btoks export` from a training checkpoint: success, and clear errors that leave --out untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from btoks_jax import cli
from btoks_jax.data.emoji_dataset import build_emoji_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    data = root / "data"
    build_emoji_dataset(data, max_concepts=30)
    workdir = root / "run"
    cmd = [sys.executable, "-m", "btoks_jax.cli", "train", "--config",
           os.path.join(ROOT, "configs", "tiny_cpu.py") + f":runlocal,steps=2,evals=0,data_dir={data}",
           "--workdir", str(workdir), "--config.progress=False", "--config.data.prepare=",
           "--config.checkpoint.async_save=False"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, workdir


@pytest.mark.xdist_group("export_ckpt")
def test_export_from_checkpoint_loads_in_transformers(trained):
    import transformers

    root, workdir = trained
    out = root / "hf"
    assert cli.main(["export", "--checkpoint", str(workdir), "--out", str(out)]) == 0
    model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|btok_0|>") == 151657


@pytest.mark.xdist_group("export_ckpt")
def test_bad_checkpoints_give_clear_errors_and_write_nothing(trained, tmp_path, capsys):
    root, workdir = trained
    out = tmp_path / "out"

    def fails(checkpoint_dir, *words):
        assert cli.main(["export", "--checkpoint", str(checkpoint_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        for w in words:
            assert w in err, err
        assert not out.exists() or not os.listdir(out)
        assert not [p for p in os.listdir(tmp_path) if "partial" in p]

    fails(tmp_path / "nowhere", "no such checkpoint directory")
    # Half-written: the only step lacks its metadata (as if killed before Orbax finalised it).
    half = tmp_path / "half"
    shutil.copytree(workdir, half)
    for step in os.listdir(half / "checkpoints"):
        if step.isdigit():
            shutil.rmtree(half / "checkpoints" / step / "meta")
    fails(half, "missing or incomplete")
    # From another config: the stored model config no longer matches the stored arrays.
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    for step in os.listdir(other / "checkpoints"):
        if step.isdigit():
            meta_path = other / "checkpoints" / step / "meta" / "metadata"
            meta = json.loads(meta_path.read_text())
            meta["model_config"]["text_config"]["hidden_size"] = 96
            meta_path.write_text(json.dumps(meta))
    fails(other, "cannot be restored")
    # A step that does not exist.
    assert cli.main(["export", "--checkpoint", str(workdir), "--out", str(out), "--step", "99"]) == 2
    assert "step 99" in capsys.readouterr().err
