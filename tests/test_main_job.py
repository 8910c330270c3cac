"""`btoks main` at smoke size: the shared pretraining stage, the arms started from it, the report."""

import json
import os

import jax
import numpy as np
import pytest

from btoks_jax import build, main_job
from btoks_jax.model_config import IM_END_ID


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("main"))
    main_job.run(workdir, steps=2, pretrain_steps=2, extra=",runlocal,evals=0", max_concepts=40)
    return workdir


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_every_arm_starts_from_the_pretrained_checkpoint(main_run):
    from flax import nnx

    pretrained, meta = build.restore_model(os.path.join(main_run, "pretrain"))
    assert meta["num_btoks"] == 0 and meta["config"]["step"]["mask_mode"] == "full"
    reference = _flat(nnx.state(pretrained.backbone))
    for arm in main_job.MAIN_ARMS:
        run_dir = os.path.join(main_run, main_job.run_name(arm, 0))
        initial, arm_meta = build.restore_model(run_dir, step=0)
        assert arm_meta["config"]["model"]["hf_dir"] == os.path.join(main_run, "hf_pretrain")
        start = _flat(nnx.state(initial.backbone))
        assert start.keys() == reference.keys()
        for name, value in reference.items():
            np.testing.assert_array_equal(start[name], value, err_msg=f"{arm}: {name}")
        if initial.num_btoks:  # the BToks start as the pretrained <|im_end|> row (the authors' intent)
            row = np.asarray(pretrained.backbone.model.embed_tokens.value)[IM_END_ID]
            np.testing.assert_array_equal(np.asarray(initial.btoks.value), np.broadcast_to(row, (4, row.size)))
        # and the run trained from there: its last step differs
        final, _ = build.restore_model(run_dir)
        assert any(not np.array_equal(v, start[k]) for k, v in _flat(nnx.state(final.backbone)).items())


def test_the_arms_share_steps_batch_and_data_order(main_run):
    configs = {arm: main_job.arm_config(main_run, arm, 0, 2, ",runlocal,evals=0") for arm in main_job.ARMS}
    for key in ("total_steps", "seed"):
        assert len({c[key] for c in configs.values()}) == 1, key
    for key in ("global_batch_size", "seed", "datasets", "buckets"):
        assert len({json.dumps(c.data[key], default=list) for c in configs.values()}) == 1, key
    assert {c.model.hf_dir for c in configs.values()} == {os.path.join(main_run, "hf_pretrain")}
    assert configs["method"].step.mask_mode == "condensation" and configs["full"].step.mask_mode == "full"
    assert configs["btoks_nce"].step.objective == "contrastive" and configs["last"].step.pooling == "last"


def test_report_has_the_table_the_plot_and_the_decoded_examples(main_run):
    report = json.load(open(os.path.join(main_run, "report.json")))
    assert set(report["table"]) == set(main_job.MAIN_ARMS)
    for rows in report["table"].values():
        assert [r["seed"] for r in rows] == [0]
        assert all(0 <= v <= 100 for v in rows[0]["hit@1"].values())
    assert report["export_check"]["max_abs_diff"] <= 1e-4
    decoded = report["decoded"]
    assert len(decoded["names"]) == main_job.NUM_DECODED + main_job.NUM_DECODED_TRAIN
    assert decoded["split"] == ["test"] * main_job.NUM_DECODED + ["train"] * main_job.NUM_DECODED_TRAIN
    assert set(decoded["decoded"]) == {"pretrain (whole image visible)", "method_seed0 (BToks only)"}
    assert all(len(v) == len(decoded["names"]) and all(isinstance(t, str) for t in v)
               for v in decoded["decoded"].values())
    text = open(os.path.join(main_run, "report.md")).read()
    for label in ("last-token + InfoNCE", "BToks + InfoNCE + GIC (condensation mask)", decoded["names"][0]):
        assert label in text
    assert os.path.getsize(os.path.join(main_run, "report.png")) > 10_000


def test_generation_from_the_btoks(main_run):
    """Greedy generation does not depend on how items are batched; a model without BToks has nothing to generate
    from under the condensation mask."""
    import btoks_jax
    from btoks_jax.evaluate.mmeb import read_eval_rows

    model = btoks_jax.from_pretrained(os.path.join(main_run, main_job.run_name("method", 0)))
    rows = read_eval_rows(os.path.join(main_run, "data", "emoji_i2t_test.jsonl"), os.path.join(main_run, "data"))
    items = [rows[0].query, rows[1].query]
    greedy = model.generate_from_btoks(items, max_new_tokens=4)
    assert greedy == model.generate_from_btoks(items[:1], max_new_tokens=4) + \
        model.generate_from_btoks(items[1:], max_new_tokens=4)  # batching changes nothing
    with pytest.raises(ValueError, match="no BToks"):
        btoks_jax.from_pretrained(os.path.join(main_run, "pretrain")).generate_from_btoks(items)
