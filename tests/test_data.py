"""Training data: MMEB-train readers, the mixture pipeline (determinism, slices, resumption, labels) and TFDS."""

import concurrent.futures
import dataclasses
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import train_utils as U

from btoks_jax.data import tfds_mmeb
from btoks_jax.data.emoji_dataset import build_emoji_dataset
from btoks_jax.data.mmeb_train import DatasetSpec, generation_text, read_mmeb_train, text_only
from btoks_jax.data.pipeline import MixtureSchedule, PipelineConfig, TrainBatchIterator, choose_bucket
from btoks_jax.inputs import encode_target
from btoks_jax.model_config import IM_END_ID, tiny_config

CFG = tiny_config()
# Emoji images are 72x72: at these pixel bounds each becomes 84x84, 9 vision tokens and 36 patches.
PIPE = PipelineConfig(global_batch_size=8, subbatch_size=4, buckets=((32, 0), (64, 64)), target_len=24,
                      image_min_pixels=28 * 28 * 4, image_max_pixels=28 * 28 * 9, num_threads=2, prefetch_batches=1)
TASKS = (("emoji_i2t", 1.0, "positive"), ("emoji_t2i", 2.0, "query"), ("emoji_cls", 1.0, "both"))


@pytest.fixture(scope="module")
def emoji(tmp_path_factory):
    return build_emoji_dataset(tmp_path_factory.mktemp("emoji") / "data", max_concepts=24)



@pytest.fixture(scope="module")
def specs(emoji):
    return [DatasetSpec(name, str(emoji.train[name]), weight=w, ntp_side=side) for name, w, side in TASKS]


def _iterator(specs, tokenizer, config=PIPE, **kwargs):
    return TrainBatchIterator(specs, config, CFG, tokenizer, **kwargs)



# ===================================== readers =====================================


def test_reader_prompt_styles_and_shards(emoji, tmp_path):
    rows = read_mmeb_train(emoji.train["emoji_i2t"], prompt_style="mmeb")
    first = rows[0]
    assert first.query.text.startswith("<|image_1|>\n") and Path(first.query.image).is_file()
    assert first.positive.image is None and first.negative is None
    assert first.source == f"{emoji.train['emoji_i2t']}: row 1"
    btoks = read_mmeb_train(emoji.train["emoji_i2t"])[0].query.text
    vlm2vec = read_mmeb_train(emoji.train["emoji_i2t"], prompt_style="vlm2vec")[0].query.text
    assert btoks.startswith("<|vision_start|><|image_pad|><|vision_end|>\n") and vlm2vec.startswith("<|image_pad|>\n")
    assert text_only(btoks) == text_only(vlm2vec) == "Identify the emoji in the given image by its name."

    # A glob of shards reads in sorted order; relative image paths start from image_root.
    lines = emoji.train["emoji_t2i"].read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:5]))
    (tmp_path / "b.jsonl").write_text("".join(lines[5:]))
    sharded = read_mmeb_train(str(tmp_path / "*.jsonl"), emoji.root)
    assert [r.positive for r in sharded] == [r.positive for r in read_mmeb_train(emoji.train["emoji_t2i"])]
    assert sharded[5].source == f"{tmp_path / 'b.jsonl'}: row 1"


GOOD = {"qry": "<|image_1|>\nWhat is it?", "qry_image_path": "images/ok.png", "pos_text": "a cat",
        "pos_image_path": ""}


@pytest.mark.parametrize("bad, field, message", [
    ({k: v for k, v in GOOD.items() if k != "pos_text"}, "pos_text", "missing"),
    ({**GOOD, "qry_image_path": "images/none.png"}, "qry_image_path", "image file not found"),
    ({**GOOD, "qry": 5}, "qry", "expected a string, got int"),
    ({**GOOD, "pos_image_path": ["images/ok.png"]}, "pos_image_path", "expected a string, got list"),
    ({**GOOD, "qry": "What is it?"}, "qry", "holds 0 <|image_1|> placeholders"),
    ({**GOOD, "pos_text": "", "pos_image_path": None}, "pos_text", "no text, image or video"),
    ({**GOOD, "neg_video_path": [3]}, "neg_video_path", "list of frame paths"),
    ({**GOOD, "neg_video_path": "frames/none"}, "neg_video_path", "folder of frame images"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, bad, field, message, write_jsonl):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.png").write_bytes(b"")
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad])
    with pytest.raises(ValueError, match=rf"bad\.jsonl: row 2: field '{field}': .*{_escape(message)}"):
        read_mmeb_train(path)


def _escape(text):
    return text.replace("|", r"\|")


def test_bad_json_and_parquet_rows(tmp_path, write_jsonl):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.png").write_bytes(b"")
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl: row 3: not valid JSON"):
        read_mmeb_train(path)
    write_jsonl(path, [GOOD, [1, 2]])
    with pytest.raises(ValueError, match=r"broken\.jsonl: row 2: field '<row>': expected an object"):
        read_mmeb_train(path)
    table = pa.table({"qry": ["<|image_1|> x", "<|image_1|> y"], "qry_image_path": ["images/ok.png", "images/ok.png"],
                      "pos_text": ["a", "b"], "pos_image_path": [None, 7]})
    pq.write_table(table, tmp_path / "rows.parquet")
    with pytest.raises(ValueError, match=r"rows\.parquet: row 2: field 'pos_image_path': expected a string, got int"):
        read_mmeb_train(tmp_path / "rows.parquet")


def test_placeholder_repairs(tmp_path, write_jsonl):
    # As the reference code: WebQA queries carry <|image_1|> without an image (dropped); VisDial negatives
    # have an image and no text (the bare placeholder).
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.png").write_bytes(b"")
    path = write_jsonl(tmp_path / "rows.jsonl", [{**GOOD, "qry": "<|image_1|>\nFind the passage.",
                                                   "qry_image_path": "", "neg_text": None,
                                                   "neg_image_path": "images/ok.png"}])
    row = read_mmeb_train(path)[0]
    # The authors' canonical text: `{body}\n` without media, the bare token for media without text.
    assert row.query.text == "Find the passage.\n" and row.query.image is None
    assert row.negative.text == "<|vision_start|><|image_pad|><|vision_end|>" and row.negative.image
    assert read_mmeb_train(path, prompt_style="vlm2vec")[0].query.text == "Find the passage."


def test_btoks_canonical_text_and_generation_text():
    """MMEB_FORMATS.md 1.1 (B): a side with media is `T\n{body}\n`, one without `{body}\n`; ChartQA-style
    trailing spaces go; the generated text keeps the newline that precedes `<|im_end|>`."""
    from btoks_jax.data.mmeb_train import Side, btoks_canonical_text, generation_text

    assert btoks_canonical_text(Side("<|image_1|>\nRepresent the given image", image="x.png")) == \
        "<|image_1|>\nRepresent the given image\n"
    assert btoks_canonical_text(Side("The answer is 12.  ")) == "The answer is 12.\n"
    assert btoks_canonical_text(Side("<|image_1|>", image="x.png")) == "<|image_1|>"
    assert btoks_canonical_text(Side("<|video_1|> Describe.", video=("a.jpg",))) == "<|video_1|>\nDescribe.\n"
    assert generation_text("<|vision_start|><|image_pad|><|vision_end|>\nA red car.\n") == "A red car.\n"
    assert generation_text("husky\n") == "husky\n"


def test_unreadable_image_fails_when_used(emoji, tokenizer, tmp_path, write_jsonl):
    (tmp_path / "images").mkdir()
    shutil.copy(read_mmeb_train(emoji.train["emoji_i2t"])[0].query.image, tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png at all")
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, {**GOOD, "qry_image_path": "images/broken.png"}])
    config = dataclasses.replace(PIPE, global_batch_size=2, subbatch_size=2)
    iterator = _iterator([DatasetSpec("rows", str(path))], tokenizer, config)
    with pytest.raises(ValueError, match=r"rows\.jsonl: row 2: field 'qry_image_path': cannot read image"):
        next(iterator)
    iterator.close()


def test_video_rows(emoji, tokenizer, tmp_path, write_jsonl):
    frames = sorted((emoji.root / "images").iterdir())[:4]
    (tmp_path / "clip").mkdir()
    for i, frame in enumerate(frames):
        shutil.copy(frame, tmp_path / "clip" / f"{i:03d}.png")
    listed = {"qry": "<|video_1|>\nDescribe the clip.", "qry_image_path": "", "pos_text": "four emojis",
              "pos_image_path": "", "qry_video_path": [f"clip/{i:03d}.png" for i in range(4)]}
    path = write_jsonl(tmp_path / "video.jsonl", [listed, {**listed, "qry_video_path": "clip"}])
    rows = read_mmeb_train(path)
    assert rows[0].query.video == rows[1].query.video and len(rows[0].query.video) == 4
    assert rows[0].query.text.startswith("<|vision_start|><|video_pad|><|vision_end|>")
    config = dataclasses.replace(PIPE, global_batch_size=2, subbatch_size=2, buckets=((32, 0), (64, 128)),
                                 video_min_pixels=28 * 28 * 4, video_max_pixels=28 * 28 * 9, video_num_frames=None)
    tfds_mmeb.build_tfds(path, "video", tmp_path / "tfds")
    stored = tfds_mmeb.read_tfds(tmp_path / "tfds", "video")[0]
    assert stored.query.video == tuple(Path(f).read_bytes() for f in rows[0].query.video)
    batches = []
    for spec in (DatasetSpec("video", str(path)), DatasetSpec("video", str(tmp_path / "tfds"), format="tfds")):
        iterator = _iterator([spec], tokenizer, config)
        batches.append(next(iterator))
        iterator.close()
    U.assert_same_batches(*batches)
    query = batches[0].query
    # 4 frames of 84x84: 2 temporal patches of 3x3 merged tokens, 72 patches.
    assert ((np.asarray(query.inputs.input_ids) == CFG.video_token_id).sum(1) == 18).all()
    assert query.layout.query_len == 64 and (np.asarray(query.inputs.patch_segment_ids) > 0).sum(1).tolist() == [72, 72]


# ===================================== mixture schedule =====================================


def test_schedule_weights_and_epochs():
    schedule = MixtureSchedule([7, 5, 3], [1.0, 2.0, 1.0], global_batch_size=8, subbatch_size=4, seed=3)
    draws = np.array([schedule.subbatch(u)[0] for u in range(6000)])
    np.testing.assert_allclose(np.bincount(draws) / len(draws), [0.25, 0.5, 0.25], atol=0.02)
    # Reading data set d: every epoch visits each of its rows exactly once, in a new order.
    rows = {d: [] for d in range(3)}
    for step in range(60):
        for position in range(8):
            d, row = schedule.locate(step, position)
            rows[d].append(row)
    for d, n in enumerate([7, 5, 3]):
        epochs = [rows[d][i:i + n] for i in range(0, len(rows[d]) - n + 1, n)]
        assert len(epochs) >= 3 and all(sorted(e) == list(range(n)) for e in epochs)
        assert len({tuple(e) for e in epochs}) > 1
    # A fresh schedule (e.g. after a restart) answers any step without replaying earlier ones.
    fresh = MixtureSchedule([7, 5, 3], [1.0, 2.0, 1.0], global_batch_size=8, subbatch_size=4, seed=3)
    assert [fresh.locate(59, p) for p in range(8)] == [schedule.locate(59, p) for p in range(8)]


def test_choose_bucket():
    buckets = ((32, 0), (64, 64), (128, 256))
    assert choose_bucket(buckets, 20, 0) == (32, 0)
    assert choose_bucket(buckets, 20, 36) == (64, 64)
    assert choose_bucket(buckets, 100, 0) == (128, 0)  # no vision anywhere: no patches to carry
    with pytest.raises(ValueError, match="no bucket"):
        choose_bucket(buckets, 129, 0)
    with pytest.raises(ValueError, match="ascend"):
        PipelineConfig(buckets=((64, 0), (32, 0)))


# ===================================== pipeline =====================================


def test_determinism_subbatches_and_seed(specs, tokenizer):
    first, second = _iterator(specs, tokenizer), _iterator(specs, tokenizer)
    batches = [next(first) for _ in range(4)]
    for batch in batches:
        U.assert_same_batches(batch, next(second))
        ids = batch.dataset_ids.reshape(-1, PIPE.subbatch_size)
        assert (ids == ids[:, :1]).all(), "a sub-batch mixes data sets"
    assert len({int(d) for b in batches for d in b.dataset_ids}) > 1
    other = _iterator(specs, tokenizer, dataclasses.replace(PIPE, seed=1))
    assert any((next(other).row_ids != b.row_ids).any() for b in batches)
    for iterator in (first, second, other):
        iterator.close()


def _barrier_agree(count):
    """A stand-in for the all-processes max: `count` threads meet, each gets the element-wise max."""
    barrier, posted = threading.Barrier(count), {}

    def make(index):
        def agree(needs):
            posted[index] = np.array(needs)
            barrier.wait()
            result = np.max([posted[i] for i in range(count)], axis=0)
            barrier.wait()  # nobody posts the next step's needs before everyone has read these
            return result
        return agree

    return [make(i) for i in range(count)]


def test_process_slices_concatenate_to_the_global_batch(specs, tokenizer):
    whole = _iterator(specs, tokenizer)
    parts = [_iterator(specs, tokenizer, process_index=i, process_count=2, agree=agree)
             for i, agree in enumerate(_barrier_agree(2))]
    assert parts[0].local_batch == 4
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            expected = next(whole)
            halves = list(pool.map(next, parts))
            assert all(h.query.layout == expected.query.layout for h in halves)
            assert all(h.positive.layout == expected.positive.layout for h in halves)
            got, want = [U.batch_arrays(h) for h in halves], U.batch_arrays(expected)
            for name, value in want.items():
                axis = 1 if name.endswith(".positions") else 0  # positions are int32[3, B, T]
                np.testing.assert_array_equal(np.concatenate([g[name] for g in got], axis), value, err_msg=name)
    for iterator in (whole, *parts):
        iterator.close()


def test_state_restore_reproduces_the_sequence(specs, tokenizer):
    run = _iterator(specs, tokenizer)
    next(run), next(run)
    state = json.loads(json.dumps(run.get_state()))  # as a checkpoint stores it
    expected = [next(run) for _ in range(2)]
    resumed = _iterator(specs, tokenizer)
    resumed.set_state(state)
    assert resumed.step == 2
    for want in expected:
        got = next(resumed)
        assert got.step == want.step
        U.assert_same_batches(got, want)
    with pytest.raises(ValueError, match="another configuration"):
        resumed.set_state({**state, "seed": 5})
    run.close()
    resumed.close()


def test_labels_score_only_target_tokens(specs, tokenizer, emoji):
    rows = {name: read_mmeb_train(emoji.train[name]) for name, _, _ in TASKS}
    iterator = _iterator(specs, tokenizer)
    seen = set()
    for _ in range(4):
        batch = next(iterator)
        for i, (dataset, row_id) in enumerate(zip(batch.dataset_ids, batch.row_ids, strict=True)):
            name, _, ntp = TASKS[dataset]
            row = rows[name][row_id]
            seen.add(name)
            for side, other, generates in (("query", "positive", ntp in ("positive", "both")),
                                           ("positive", "query", ntp in ("query", "both"))):
                packed = getattr(batch, side)
                labels, mask = packed.labels[i], packed.label_mask[i]
                target_ids = np.asarray(packed.inputs.input_ids)[i, packed.layout.target_slice]
                if not generates:
                    assert not mask.any()
                    continue
                ids, prefix_len = encode_target(tokenizer, generation_text(getattr(row, other).text), PIPE.target_len)
                body = ids[prefix_len:]  # the text and <|im_end|>: exactly what is scored
                assert body[-1] == IM_END_ID and mask.sum() == len(body)
                np.testing.assert_array_equal(labels[mask], body)
                np.testing.assert_array_equal(target_ids[:len(ids)], ids)
                assert not mask[len(ids) - 1:].any() and not mask[:prefix_len - 1].any()
    assert seen == {name for name, _, _ in TASKS}
    iterator.close()


def test_overlong_text_is_cut_and_vision_kept(emoji, tokenizer):
    spec = [DatasetSpec("emoji_i2t", str(emoji.train["emoji_i2t"]))]
    short = dataclasses.replace(PIPE, buckets=((16, 64),))
    batch = next(iterator := _iterator(spec, tokenizer, short))
    iterator.close()
    ids = np.asarray(batch.query.inputs.input_ids)[:, :16]
    real = np.asarray(batch.query.inputs.segment_ids)[:, :16] == 1
    assert real.all(), "the query fills the bucket after truncation"
    assert ((ids == CFG.image_token_id).sum(1) == 9).all()  # every image token survives
    kept = tokenizer.decode(ids[0][ids[0] != CFG.image_token_id])
    assert kept.startswith("<|vision_start|><|vision_end|>\nIdentify") and not kept.endswith("name.")
    tiny = dataclasses.replace(PIPE, buckets=((8, 64),))
    with pytest.raises(ValueError, match=r"emoji_i2t_train\.jsonl: row \d+: query side: 11 vision tokens exceed"):
        next(iterator := _iterator(spec, tokenizer, tiny))
    iterator.close()


# ===================================== TFDS / ArrayRecord =====================================


def test_tfds_round_trip(emoji, tokenizer, specs, tmp_path):
    data_dir = tmp_path / "tfds"
    for name, _, _ in TASKS:
        tfds_mmeb.build_tfds(emoji.train[name], name, data_dir)
    for name, _, _ in TASKS:
        source, stored = read_mmeb_train(emoji.train[name]), tfds_mmeb.read_tfds(data_dir, name)
        assert len(stored) == len(source)
        for want, got in zip(source, stored, strict=True):
            assert got.source == want.source and got.negative == want.negative
            for side in ("query", "positive"):
                a, b = getattr(want, side), getattr(got, side)
                assert b.text == a.text and b.video == a.video
                assert b.image == (None if a.image is None else Path(a.image).read_bytes())
    # The same mixture read from ArrayRecord gives the same batches as from the JSONL files.
    from_tfds = [DatasetSpec(s.name, str(data_dir), weight=s.weight, ntp_side=s.ntp_side, format="tfds")
                 for s in specs]
    a, b = _iterator(specs, tokenizer), _iterator(from_tfds, tokenizer)
    for _ in range(2):
        U.assert_same_batches(next(a), next(b))
    a.close()
    b.close()


def test_authors_frame_choice_and_natural_frame_order(tmp_path):
    """linspace(0, n - 1, 8) truncated (all frames when fewer), over frames sorted with digit runs as numbers."""
    from btoks_jax.data.media import frame_paths
    from btoks_jax.processing.video import linspace_frame_indices

    assert linspace_frame_indices(30, 8).tolist() == [0, 4, 8, 12, 16, 20, 24, 29]
    assert linspace_frame_indices(8, 8).tolist() == list(range(8))
    assert linspace_frame_indices(5, 8).tolist() == [0, 1, 2, 3, 4]
    folder = tmp_path / "v"
    folder.mkdir()
    for name in ("frame_10.jpg", "frame_9.jpg", "frame_100.jpg", "notes.txt"):
        (folder / name).write_bytes(b"")
    assert [Path(p).name for p in frame_paths("v", tmp_path)] == ["frame_9.jpg", "frame_10.jpg", "frame_100.jpg"]
    assert PipelineConfig().video_frame_sampling == "linspace" and PipelineConfig().video_min_pixels == 3136
