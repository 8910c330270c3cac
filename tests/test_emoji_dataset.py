"""The embedded emoji data set: determinism, the concept split, file formats, images and credits."""

import json
import zlib

import numpy as np
import pytest
from PIL import Image

from btoks_jax.data import emoji_dataset as ed
from btoks_jax.evaluate import mmeb

TRAIN_KEYS = {"qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path"}


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return ed.build_emoji_dataset(tmp_path_factory.mktemp("emoji") / "full")


@pytest.fixture(scope="module")
def concept_of():
    return {e.code: e.concept for e in ed.load_emojis()}


def _codes(rows):
    paths = []
    for row in rows:
        paths += [row.get("qry_image_path"), row.get("pos_image_path"), row.get("qry_img_path")]
        paths += row.get("tgt_img_path", [])
    return {p.removeprefix("images/").removesuffix(".png") for p in paths if p}


def test_counts_and_split_by_concept(full, concept_of):
    manifest = json.loads(full.manifest.read_text())
    counts = manifest["counts"]
    total = counts["concepts"]["train"] + counts["concepts"]["test"]
    assert total > 1500 and counts["images"]["train"] + counts["images"]["test"] > 3500
    assert counts["concepts"]["test"] / total == pytest.approx(0.2, abs=0.01)
    assert counts["subgroups"] > 90
    for task in ed.TASKS:
        assert counts["rows"][task]["train"] == counts["images"]["train"]
        assert counts["rows"][task]["test"] == counts["images"]["test"]
    train_codes = set().union(*(_codes(_read_jsonl(full.train[t])) for t in ed.TASKS))
    test_codes = set().union(*(_codes(_read_jsonl(full.test[t])) for t in ed.TASKS))
    train_concepts = {concept_of[c] for c in train_codes}
    test_concepts = {concept_of[c] for c in test_codes}
    assert not train_concepts & test_concepts
    assert test_concepts == set(manifest["test_concepts"])
    # Skin-tone variants ("1f44b-1f3fb") follow their base emoji ("1f44b") to the same side.
    for code in train_codes | test_codes:
        base, _, tone = code.partition("-")
        if tone.startswith("1f3f") and "-" not in tone:
            assert (base in test_codes) == (code in test_codes), code
    # Every subgroup has training examples.
    subgroups_train = {r["pos_text"] for r in _read_jsonl(full.train["emoji_cls"])}
    assert subgroups_train == set(manifest["subgroups"])


def test_train_rows_are_mmeb_train_format(full):
    for task in ed.TASKS:
        rows = _read_jsonl(full.train[task])
        for row in rows:
            assert set(row) == TRAIN_KEYS
            assert ("<|image_1|>" in row["qry"]) == bool(row["qry_image_path"])
            assert ("<|image_1|>" in row["pos_text"]) == bool(row["pos_image_path"])
            assert (full.root / (row["qry_image_path"] or row["pos_image_path"])).is_file()
    names = [r["pos_text"] for r in _read_jsonl(full.train["emoji_i2t"])]
    assert len(names) == len(set(names)) and "grinning face" in names and "flag Japan" in names + [
        r["qry_text"] for r in _read_jsonl(full.test["emoji_t2i"])]


def test_eval_rows_read_by_mmeb_reader(full):
    test_images = _codes(_read_jsonl(full.test["emoji_i2t"]))
    for task in ed.TASKS:
        rows = mmeb.read_eval_rows(full.test[task])  # also checks that every image exists
        assert len(rows) == len(test_images)
        for row in rows:
            assert row.relevance[0] == 1.0 and sum(row.relevance) == 1.0
            assert len(set(row.candidates)) == len(row.candidates)
            expected = {"emoji_cls": len(json.loads(full.manifest.read_text())["subgroups"])}
            assert len(row.candidates) == expected.get(task, ed.NUM_NAME_NEGATIVES + 1)
    # Negatives are drawn from held-out images only.
    assert _codes(_read_jsonl(full.test["emoji_t2i"])) == test_images


def test_images_open_as_rgb_and_credits(full):
    files = sorted(full.images.iterdir())
    assert len(files) == sum(json.loads(full.manifest.read_text())["counts"]["images"].values())
    for path in files[::200]:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (72, 72)
            assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent corners became white
    credits = full.credits.read_text()
    assert "Twemoji" in credits and "Twitter" in credits and "CC-BY 4.0" in credits
    assert "creativecommons.org/licenses/by/4.0" in credits


def test_deterministic_and_idempotent(tmp_path):
    a = ed.build_emoji_dataset(tmp_path / "a", seed=3, max_concepts=40)
    b = ed.build_emoji_dataset(tmp_path / "b", seed=3, max_concepts=40)
    counts = json.loads(a.manifest.read_text())["counts"]["concepts"]
    assert counts["train"] > 0 and counts["test"] > 0
    for name in [p.name for p in a.root.glob("*.jsonl")] + [ed.MANIFEST]:
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes(), name
    assert sorted(p.name for p in a.images.iterdir()) == sorted(p.name for p in b.images.iterdir())
    stamp = a.manifest.stat().st_mtime_ns
    assert ed.build_emoji_dataset(tmp_path / "a", seed=3, max_concepts=40) == a
    assert a.manifest.stat().st_mtime_ns == stamp  # skipped: same settings
    other = ed.build_emoji_dataset(tmp_path / "a", seed=4, max_concepts=40)
    assert json.loads(other.manifest.read_text())["settings"]["seed"] == 4  # rebuilt in place
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        ed.build_emoji_dataset(tmp_path, max_concepts=10)
    assert (tmp_path / "notes.txt").exists()


def test_cli_prints_counts(tmp_path, capsys):
    ed.main(["--out", str(tmp_path / "cli"), "--max-concepts", "12", "--seed", "1"])
    out = capsys.readouterr().out
    assert "emoji_i2t" in out and "train rows" in out
    assert (tmp_path / "cli" / ed.MANIFEST).is_file()


def test_oracle_embedding_scores_perfectly(full):
    # An embedding that maps an image to the vector of its own name (or subgroup) must rank the positive first.
    by_code = {e.code: e for e in ed.load_emojis()}

    def vector(key):
        return np.random.default_rng(zlib.crc32(key.encode())).normal(size=16)

    def embed(items):
        keys = []
        for item in items:
            emoji = by_code[item.image.rsplit("/", 1)[-1].removesuffix(".png")] if item.image else None
            if emoji is None:
                keys.append(item.text)
            else:
                keys.append(emoji.subgroup if "subgroup" in item.instruction else emoji.name)
        return np.stack([vector(k) for k in keys])

    for task in ed.TASKS:
        scores = mmeb.evaluate_dataset(mmeb.read_eval_rows(full.test[task]), embed, progress=False)
        assert scores["hit@1"] == 1.0, task
