"""From the published layouts to an MMEB-V2 score table: the miniature fixtures of every family go through
`btoks data prepare`, `btoks train` (the 2B recipe at CPU size on the prepared 25-set mixture) and
`btoks eval --mmeb-v2`, which writes VLM2Vec's score files and the leaderboard JSON for all 78 sets."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from make_mmeb_fixtures import write_all

from btoks_jax import cli
from btoks_jax.evaluate import mmeb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "qwen2vl_2b.py")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    out = tmp_path_factory.mktemp("mmeb")
    return out, write_all(out)


@pytest.fixture(scope="module")
def trained(fixtures, tmp_path_factory):
    out, counts = fixtures
    root = out / "train"
    assert cli.main(["data", "prepare", "--root", str(root)]) == 0
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["prompt_style"] == "btoks"
    workdir = tmp_path_factory.mktemp("run")
    # Two steps: one inside the lambda window (joint), one after it (contrastive). The dense attention path keeps
    # compile times of the 78 sets' embedding programs short on CPU; tests/test_recipe.py trains both kernels.
    assert cli.main(["train", "--config", f"{RECIPE}:runlocal,mixture=mmeb,data_root={root},steps=2",
                     "--workdir", str(workdir), "--config.checkpoint.async_save=False",
                     "--config.model.attention_impl=dense"]) == 0
    return workdir


def test_prepare_train_and_score_all_78(fixtures, trained, tmp_path):
    out, counts = fixtures
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # two finite steps on the 25-set mixture

    scores_dir = tmp_path / "scores"
    argv = ["eval", "--model", str(trained), "--mmeb-v2", str(out / "eval"), "--out", str(scores_dir),
            "--batch-size", "8", "--model-name", "tiny-btoks"]
    assert cli.main(argv) == 0
    expected = {**counts["image"], **counts["video"], **counts["visdoc"]}
    assert len(expected) == 78
    for spec in mmeb.MMEB_V2_DATASETS:
        path = scores_dir / spec.modality / f"{spec.name}_score.json"
        scores = json.loads(path.read_text())
        assert list(scores)[:24] == [f"{m}@{k}" for m in ("hit", "ndcg_linear", "ndcg_exponential", "precision",
                                                           "recall", "f1", "map", "mrr") for k in (1, 5, 10)]
        assert scores["num_data"] == expected[spec.name], spec.name
        assert 0.0 <= scores[spec.metric] <= 1.0
    board = json.loads((scores_dir / "tiny-btoks.json").read_text())
    assert board["metadata"]["model_name"] == "tiny-btoks" and "report_generated_date" in board["metadata"]
    assert set(board["metrics"]) == {"image", "video", "visdoc"}
    assert "ViDoSeek-page-fixed" in board["metrics"]["visdoc"] and "ViDoSeek-page" not in board["metrics"]["visdoc"]
    assert not [k for m in board["metrics"].values() for k, v in m.items() if v == "FILE_N/A"]
    summary = json.loads((scores_dir / "summary.json").read_text())
    assert summary["complete"] and summary["missing"] == {}

    # A rerun reuses every score file; a fresh score directory over the same cache embeds nothing again.
    store = scores_dir / "cache" / "embeddings"
    shards = sorted(p.name for p in store.rglob("part-*.npz"))
    assert shards
    rerun = tmp_path / "rerun"
    assert cli.main(argv[:5] + ["--out", str(rerun), "--cache-dir", str(scores_dir / "cache"), "--batch-size", "8",
                                "--model-name", "tiny-btoks", "--datasets", "ViDoRe_arxivqa,K700"]) == 0
    assert sorted(p.name for p in store.rglob("part-*.npz")) == shards  # nothing new was embedded
    for name, modality in (("ViDoRe_arxivqa", "visdoc"), ("K700", "video")):
        assert (json.loads((rerun / modality / f"{name}_score.json").read_text())
                == json.loads((scores_dir / modality / f"{name}_score.json").read_text()))


def test_missing_sets_are_named(fixtures, trained, tmp_path, capsys):
    out, _ = fixtures
    partial = tmp_path / "partial"
    shutil.copytree(out / "eval" / "vidore" / "arxivqa_test_subsampled_beir",
                    partial / "vidore" / "arxivqa_test_subsampled_beir")
    assert cli.main(["eval", "--model", str(trained), "--mmeb-v2", str(partial), "--out", str(tmp_path / "s"),
                     "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "77 of the 78 data sets were not found" in printed and "ImageNet-1K" in printed
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert not summary["complete"] and len(summary["missing"]) == 77
    assert summary["datasets"].keys() == {"ViDoRe_arxivqa"}
