"""`btoks embed` and `btoks eval` from the command line, on a tiny exported directory."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flax import nnx

import btoks_jax
from btoks_jax import cli
from btoks_jax.btoks import BToksModel
from btoks_jax.convert.hf_export import export_hf
from btoks_jax.data.emoji_dataset import build_emoji_dataset
from btoks_jax.evaluate import mmeb
from btoks_jax.model_config import tiny_config
from btoks_jax.processing import load_tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = build_emoji_dataset(root / "data", max_concepts=30)
    model = BToksModel(tiny_config(), 4, rngs=nnx.Rngs(3))
    out = export_hf(model, str(root / "hf"), tokenizer=load_tokenizer(), progress=False)
    return root, out, data


def _rows(root, data):
    images = sorted(os.listdir(data.root / "images"))[:3]
    rows = [{"text": "grinning face"}, {"text": "", "image": f"data/images/{images[0]}"},
            {"text": "a flag", "instruction": "Represent the text:"},
            {"text": "", "image": f"data/images/{images[1]}", "instruction": "<|image_1|>\nWhat is this emoji?"},
            {"video": [f"data/images/{images[0]}", f"data/images/{images[1]}"], "text": "two frames"}]
    path = root / "inputs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, rows


@pytest.mark.xdist_group("cli")
def test_embed_command_equals_python_api(exported):
    root, hf_dir, data = exported
    path, rows = _rows(root, data)
    out = root / "vectors.npy"
    assert cli.main(["embed", "--model", hf_dir, "--input", str(path), "--output", str(out), "--batch-size", "2"]) == 0
    vectors = np.load(out)
    assert vectors.shape == (len(rows), 48)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    items = cli._read_embed_rows(str(path))
    api = btoks_jax.from_pretrained(hf_dir).embed_items(items, progress=False)
    assert np.abs(vectors - api).max() <= 1e-5


@pytest.mark.xdist_group("cli")
def test_embed_names_the_bad_row(exported, capsys):
    root, hf_dir, _ = exported
    path = root / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "x", "image": "missing.png"}) + "\n")
    assert cli.main(["embed", "--model", hf_dir, "--input", str(path), "--output", str(root / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "'image'" in err and "missing.png" in err
    assert not (root / "x.npy").exists()


@pytest.mark.xdist_group("cli")
def test_eval_runs_on_any_mmeb_v2_folder(exported, tmp_path):
    """A folder of MMEB-V2-format files given by path: one local image->text set and one text->image set."""
    root, hf_dir, data = exported
    images = sorted(os.listdir(data.root / "images"))[:4]
    folder = tmp_path / "my_eval"
    (folder / "imgs").mkdir(parents=True)
    for name in images:
        (folder / "imgs" / name).write_bytes((data.root / "images" / name).read_bytes())
    i2t = [{"qry_inst": "<|image_1|>\nName it.", "qry_text": "", "qry_img_path": f"imgs/{images[i]}",
            "tgt_inst": "", "tgt_text": ["a", "b", "c"], "tgt_img_path": ["", "", ""]} for i in range(3)]
    t2i = [{"qry_inst": "Find:", "qry_text": "x", "qry_img_path": "", "tgt_inst": "<|image_1|>",
            "tgt_text": ["", ""], "tgt_img_path": [f"imgs/{images[i]}", f"imgs/{images[3]}"]} for i in range(2)]
    (folder / "MyI2T.jsonl").write_text("\n".join(json.dumps(r) for r in i2t))
    (folder / "MyT2I.jsonl").write_text("\n".join(json.dumps(r) for r in t2i))
    out = tmp_path / "scores"
    assert cli.main(["eval", "--model", hf_dir, "--data", str(folder), "--out", str(out)]) == 0
    model = btoks_jax.from_pretrained(hf_dir)

    def embed(items):  # what the command embeds with at its defaults (btoks pooling, batches of 32)
        return model.embed_items(items, batch_size=32, progress=False)

    for name in ("MyI2T", "MyT2I"):
        scores = json.loads((out / f"{name}_score.json").read_text())
        # Names outside MMEB-V2 rank locally; the score file holds exactly what the Python API computes.
        want = mmeb.evaluate_dataset(mmeb.read_eval_rows(folder / f"{name}.jsonl"), embed, "local", 32,
                                     progress=False)
        assert scores == want and scores["num_data"] == (3 if name == "MyI2T" else 2)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["datasets"]) == {"MyI2T", "MyT2I"}
