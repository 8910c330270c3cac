"""`btoks data prepare` on the miniature training download (tests/mmeb_fixtures/train.py), both prompt styles.

The expected strings are the final ones of MMEB_FORMATS section 1: the authors' ("btoks", pads wrapped in
vision boundaries) and VLM2Vec's ("vlm2vec", bare pads), after `read_mmeb_train` in that style.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from btoks_jax import cli
from btoks_jax.data import mmeb_prepare
from btoks_jax.data.mmeb_prepare import DATASETS, VLM2VEC_CAPS, parse_caps, prepare
from btoks_jax.data.mmeb_train import DatasetSpec, Side, btoks_canonical_text, read_mmeb_train
from btoks_jax.data.pipeline import open_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mmeb_fixtures import train as fixture  # noqa: E402

IMG = {"btoks": "<|vision_start|><|image_pad|><|vision_end|>", "vlm2vec": "<|image_pad|>"}
VID = {"btoks": "<|vision_start|><|video_pad|><|vision_end|>", "vlm2vec": "<|video_pad|>"}
STYLES = ("btoks", "vlm2vec")


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    root = tmp_path_factory.mktemp("download")
    return root, fixture.write(root)


@pytest.fixture(scope="module")
def prepared(download, tmp_path_factory):
    """{style: OUT}: "btoks" through the Python API, "vlm2vec" through `btoks data prepare`."""
    root, _ = download
    outs = {style: tmp_path_factory.mktemp(f"prepared_{style}") for style in STYLES}
    report = prepare(root, outs["btoks"], progress=False)
    assert report["missing"] == {} and report["skipped"] == [] and len(report["prepared"]) == 25
    assert cli.main(["data", "prepare", "--root", str(root), "--out", str(outs["vlm2vec"]), "--prompt-style",
                     "vlm2vec", "--no-progress"]) == 0
    return outs


def _rows(out: Path, name: str, style: str, root: Path):
    """Prepared rows; their media lie in the download root `root` (reached with '..') or under `out`."""
    return read_mmeb_train(out / f"{name}.jsonl", out, prompt_style=style, media_roots=[root])


def _texts(row):
    return (row.query.text, row.positive.text, row.negative.text if row.negative else None)


def _recipe_names():
    spec = importlib.util.spec_from_file_location("recipe_2b", Path(__file__).parents[1] / "configs" / "qwen2vl_2b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, [name for name, _, _ in module.MMEB_TRAIN + module.EXTRA]


# ===================================== counts and the manifest =====================================


@pytest.mark.parametrize("style", STYLES)
def test_manifest_counts(download, prepared, style):
    root, counts = download
    out = prepared[style]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(counts) == set(DATASETS) == set(manifest["datasets"]) and manifest["missing"] == {}
    assert manifest["prompt_style"] == style
    for name, expected in counts.items():
        entry = manifest["datasets"][name]
        assert entry["complete"] and entry["prompt_style"] == style and entry["file"] == f"{name}.jsonl"
        assert entry["rows_written"] == expected == len(_rows(out, name, style, download[0])), name
        assert all((root / f).is_file() for f in entry["source_files"]) and entry["cap"] is None
    datasets = manifest["datasets"]
    assert datasets["A-OKVQA"]["rows_skipped"] == {"empty query or positive side": 1}
    assert datasets["video_caption_300k"]["rows_skipped"] == {"no frames in the folder": 1}
    assert datasets["video_qa_240k"]["rows_skipped"] == {"no frames in the folder": 1}
    assert datasets["ImageNet_1K"]["split"] == "train" and datasets["ImageNet_1K"]["negatives"] == "authors"
    # Published counts are checked, and the miniature's do not match: warnings, not failures.
    assert datasets["ImageNet_1K"]["published_rows"] == 100_000
    assert any("published" in w for w in datasets["ImageNet_1K"]["warnings"])
    assert datasets["colpali_train_set"]["source_rows"] == 4  # the test split is not read
    assert any("3 of the 82 shards" in w for w in datasets["colpali_train_set"]["warnings"])
    assert datasets["colpali_train_set"]["media"]["written"] == 3  # two rows share a page: written once


def test_mixture_of_the_recipe_reads_the_prepared_folder(download, prepared):
    recipe, names = _recipe_names()
    assert tuple(names) == DATASETS
    config = recipe.get_config(f"data_root={prepared['btoks']},media_root={download[0]}")
    for spec in config.data.datasets:
        rows = open_rows(DatasetSpec(name=spec["name"], path=spec["path"], image_root=spec["image_root"],
                                     media_roots=spec["media_roots"]), config.data.prompt_style)
        assert rows, spec["name"]
    # Without the download root as a media folder, the rows' '..' into it is refused, naming what to pass.
    spec = recipe.get_config(f"data_root={prepared['btoks']}").data.datasets[0]
    assert spec["name"] == "ImageNet_1K" and not spec["media_roots"]
    with pytest.raises(ValueError, match=r"ImageNet_1K\.jsonl: row 1: field 'qry_image_path': media path '\.\./.*"
                                         r"is outside the data folder .*media_root=DIR"):
        open_rows(DatasetSpec(name=spec["name"], path=spec["path"], image_root=spec["image_root"]), "btoks")


# ===================================== the strings, family by family =====================================


def test_mmeb_train_strings(download, prepared):
    expected = {
        "btoks": {
            ("ImageNet_1K", 0): (f"{IMG['btoks']}\nRepresent the given image for classification\n",
                                 "plane, carpenter's plane, woodworking plane\n", None),
            ("ChartQA", 0): (f"{IMG['btoks']}\nRepresent the given image with the following question: Is the value "
                             "of Favorable 38 in 2015?\n", "Yes\n", "No\n"),
            ("ChartQA", 1): (f"{IMG['btoks']}\nRepresent the given image with the following question: What is the "
                             "value of the tallest bar?\n", "10.5\n", "7.2\n"),
            ("MSCOCO_t2i", 0): ("Find me an everyday image that matches the given caption: A teddy bear shop is "
                                "equipped with a door guard teddy and a neighbor teddy above.\n",
                                f"{IMG['btoks']}\nRepresent the given image.\n", None),
            ("WebQA", 0): ("Find a Wikipedia image that answers this question: Which body part is found on both a "
                           "1913 D Barber half and a 1914 Barber Quarter?\n",
                           f"{IMG['btoks']}\nRepresent the given Wikipedia image with related text information: "
                           "1913-D Barber half obverse.\n", None),
            ("VisDial", 0): ("Represent the given dialogue about an image, which is used for image retrieval:\n"
                             "Q:is this a child or adult\nA:adult\nQ:male or female\nA:male\nQ:are they inside or "
                             "outside\nA:inside\nQ:what color is the dog\nA:tan\n",
                             f"{IMG['btoks']}\nRepresent the given image\n", f"{IMG['btoks']}\n"),
            ("MSCOCO", 0): (f'{IMG["btoks"]}\nSelect the portion of the image that isolates the object labeled as '
                            '"hot dog"\n', f"{IMG['btoks']}\nRepresent the given cropped image of the object\n", None),
            ("OK-VQA", 0): (f"{IMG['btoks']}\nRepresent the given image with the following question: What is the "
                            "hairstyle of the blond called?\n", "pony tail\n", "husky\n"),
            ("N24News", 0): (f"{IMG['btoks']}\nRepresent the given news image with the following caption for domain "
                             "classification: Danai Gurira and André Holland in a theater at New York University, "
                             "where they met in the Tisch Graduate Acting Program.\n", "Theater\n",
                             "Global Business\n"),
            ("CIRR", 0): (f"{IMG['btoks']}\nGiven an image, find a similar everyday image with the described "
                          "changes: Many hamster together playing in a different background.\n",
                          f"{IMG['btoks']}\nRepresent the given image.\n", None),
            ("MSCOCO_i2t", 0): (f"{IMG['btoks']}\nFind an image caption describing the given everyday image.\n",
                                "A skateboarder in mid air following a jump form cincrete.\n", None),
        },
        "vlm2vec": {
            ("ImageNet_1K", 0): ("<|image_pad|>\nRepresent the given image for classification\n",
                                 "plane, carpenter's plane, woodworking plane", None),
            ("ChartQA", 0): ("<|image_pad|>\nRepresent the given image with the following question: Is the value of "
                             "Favorable 38 in 2015?\n", "Yes", "No"),
            ("ChartQA", 1): ("<|image_pad|>\nRepresent the given image with the following question: What is the "
                             "value of the tallest bar?\n", "10.5 ", "7.2 "),
            ("MSCOCO_t2i", 0): ("Find me an everyday image that matches the given caption: A teddy bear shop is "
                                "equipped with a door guard teddy and a neighbor teddy above.\n",
                                "<|image_pad|>\nRepresent the given image.\n", None),
            # VLM2Vec keeps a lone pad in WebQA queries without image; the reader drops it with its newline.
            ("WebQA", 0): ("Find a Wikipedia image that answers this question: Which body part is found on both a "
                           "1913 D Barber half and a 1914 Barber Quarter?",
                           "<|image_pad|>\nRepresent the given Wikipedia image with related text information: "
                           "1913-D Barber half obverse.\n", None),
            ("VisDial", 0): ("Represent the given dialogue about an image, which is used for image retrieval: "
                             "Q:is this a child or adult\nA:adult\nQ:male or female\nA:male\nQ:are they inside or "
                             "outside\nA:inside\nQ:what color is the dog\nA:tan\n\n",
                             "<|image_pad|>\nRepresent the given image\n", "<|image_pad|>"),
            ("MSCOCO", 0): ('<|image_pad|>\nSelect the portion of the image that isolates the object labeled as '
                            '"hot dog"\n', "<|image_pad|>\nRepresent the given cropped image of the object", None),
            ("OK-VQA", 0): ("<|image_pad|>\nRepresent the given image with the following question: What is the "
                            "hairstyle of the blond called?\n", "pony tail", "husky"),
            ("N24News", 0): ("<|image_pad|>\nRepresent the given news image with the following caption for domain "
                             "classification: Danai Gurira and André Holland in a theater at New York University, "
                             "where they met in the Tisch Graduate Acting Program.\n", "Theater", "Global Business"),
            ("CIRR", 0): ("<|image_pad|>\nGiven an image, find a similar everyday image with the described changes: "
                          "Many hamster together playing in a different background.\n",
                          "<|image_pad|>\nRepresent the given image.\n", None),
            ("MSCOCO_i2t", 0): ("<|image_pad|>\nFind an image caption describing the given everyday image.\n",
                                "A skateboarder in mid air following a jump form cincrete.", None),
        },
    }
    for style, cases in expected.items():
        out = prepared[style]
        for (name, index), want in cases.items():
            row = _rows(out, name, style, download[0])[index]
            assert _texts(row) == want, (style, name, index)
        webqa, visdial, mscoco = (_rows(out, n, style, download[0])[0] for n in ("WebQA", "VisDial", "MSCOCO"))
        assert webqa.query.image is None and Path(webqa.positive.image).is_file()
        assert Path(visdial.negative.image).name == "VisDial_image_61616.jpg" and visdial.query.image is None
        assert mscoco.positive.image.endswith("images/MSCOCO/Train/558840_object_hot dog.jpg")
        assert Path(mscoco.positive.image).is_file()
        assert [r.positive.text for r in _rows(out, "A-OKVQA", style, download[0])] == (
            ["cab\n", "left\n"] if style == "btoks" else ["cab", "left"])


def test_colpali_strings(download, prepared):
    options = fixture.COLPALI_OPTIONS
    expected = {
        "btoks": [
            (f"{IMG['btoks']}\nComparing panels a, b, c, and d, which statement best describes the data variance? "
             f"Options: {options}\n", "The variance of the data is inconsistent across the panels.\n"),
            (f"{IMG['btoks']}\nWhat is the duration of the course mentioned in the image?\n",
             "['five to ten hours, not including field trips']\n"),
            (f"{IMG['btoks']}\nWhat is the date?\nYour answer should be very brief.\n", "OCTOBER 17, 1995.\n"),
        ],
        "vlm2vec": [
            ("<|image_pad|> Comparing panels a, b, c, and d, which statement best describes the data variance?",
             "D"),
            ("<|image_pad|> What is the duration of the course mentioned in the image?",
             "['five to ten hours, not including field trips']"),
            ("<|image_pad|> What is the date?\nYour answer should be very brief.", "OCTOBER 17, 1995."),
        ],
    }
    for style, want in expected.items():
        rows = _rows(prepared[style], "colpali_train_set", style, download[0])
        assert [(r.query.text, r.positive.text) for r in rows[:3]] == want, style
        assert all(r.query.image and r.positive.image is None and r.negative is None for r in rows)
        assert rows[2].query.image == rows[3].query.image and rows[0].query.image.endswith(".jpg")
        assert Path(rows[2].query.image).read_bytes()[:4] == b"\x89PNG"


def test_visrag_strings(download, prepared):
    info = ("This query is related to retrieving an infographic that visually presents statistical or factual "
            "information using charts, icons, and structured layouts. The retrieved image should contain the "
            "necessary visual elements to provide the best context for answering the query: ")
    chart = ("This query is related to retrieving a relevant chart that visually represents numerical or "
             "categorical data. The retrieved chart should contain bar graphs, line charts, or other visual "
             "elements necessary to analyze trends, compare values, or extract insights related to the query: ")
    q0 = "which are the countries with Chinese speaking population other than China according to this infographic?"
    q1 = "What was the share of online sales in 2019?"
    p0, p1 = "An infographic with structured data, charts, and annotations.", ("A statistical chart comparing values "
                                                                              "or analyzing trends.")
    expected = {
        "btoks": [(f"{info}{q0}\n", f"{IMG['btoks']}\n{p0}\n"), (f"{chart}{q1}\n", f"{IMG['btoks']}\n{p1}\n")],
        "vlm2vec": [(f"{info} {q0} ", f"{p0}  <|image_pad|>"), (f"{chart} {q1} ", f"{p1}  <|image_pad|>")],
    }
    for style, want in expected.items():
        rows = _rows(prepared[style], "visrag-indomain", style, download[0])
        assert [(r.query.text, r.positive.text) for r in rows[:2]] == want, style
        assert all(r.query.image is None and r.positive.image for r in rows) and len(rows) == 5
        assert rows[1].positive.image == rows[2].positive.image  # one page, written once


def test_llavahound_strings_and_frames(download, prepared):
    caption = "The video opens with a view of an indoor court marked with various lines. Players throw red balls."
    question, answer = "What is the setting of the video?", "The setting appears to be an indoor sports court."
    expected = {
        "btoks": {
            "video_caption_300k": (f"{VID['btoks']}\nWrite an in-depth depiction of the video, covering all its "
                                   "aspects.\n", f"{caption}\n"),
            "video_caption_300k-video": (f"Find a video that contains the following visual content: {caption}\n",
                                         f"Understand the content of the provided video: {VID['btoks']}\n"),
            "video_qa_240k": (f"{VID['btoks']}\nAnswer a question based on the content of a video.\n{question}\n",
                              f"{answer}\n"),
        },
        "vlm2vec": {
            "video_caption_300k": ("<|video_pad|>\nWrite an in-depth depiction of the video, covering all its "
                                   "aspects.", caption),
            "video_caption_300k-video": (f"Find a video that contains the following visual content: {caption}",
                                         "Understand the content of the provided video: <|video_pad|>"),
            "video_qa_240k": (f"Answer a question based on the content of a video. <|video_pad|>\n{question}",
                              answer),
        },
    }
    picks = {"v_--0edUL8zmA-Scene-001": [0, 2, 5, 8, 10, 13, 16, 19],  # linspace(0, 19, 8).astype(int)
             "v_0Ad3bOcIpkE-Scene-004": [0, 1, 3, 4, 6, 7, 9, 11],  # linspace(0, 11, 8).astype(int)
             "v_1qs3ieXHJ5s-Scene-002": [0, 1, 2, 3, 4]}  # fewer than 8: all
    for style, cases in expected.items():
        for name, want in cases.items():
            rows = _rows(prepared[style], name, style, download[0])
            assert (rows[0].query.text, rows[0].positive.text) == want, (style, name)
            for row, video in zip(rows, [v for v in fixture.VIDEOS if v in picks] if name != "video_qa_240k"
                                  else ["v_--0edUL8zmA-Scene-001", "v_1qs3ieXHJ5s-Scene-002"]):
                side = row.positive if name.endswith("-video") else row.query
                names = fixture.frame_names(video)
                assert [Path(f).name for f in side.video] == [names[i] for i in picks[video]], (name, video)
                assert all(Path(f).parent.name == video and Path(f).is_file() for f in side.video)
                assert side.image is None


def test_canonical_form_is_a_fixed_point():
    for side in (Side("<|image_1|>\nRepresent the given image\n", image="x"), Side("<|image_1|>\n", image="x"),
                 Side("Understand the content of the provided video: <|video_1|>\n", video=("f",)),
                 Side("Represent the dialogue:\nQ:a\nA:b\n"), Side("husky\n"), Side("<|image_1|>", image="x")):
        assert btoks_canonical_text(side) == side.text


# ===================================== resuming, options, errors =====================================


def test_resume_partial_files_and_settings(download, tmp_path, monkeypatch):
    root, counts = download
    out = tmp_path / "out"
    assert prepare(root, out, only="MSCOCO,NIGHTS", progress=False)["prepared"] == ["MSCOCO", "NIGHTS"]
    mtime = (out / "MSCOCO.jsonl").stat().st_mtime_ns
    again = prepare(root, out, only=["MSCOCO", "NIGHTS"], progress=False)
    assert again["prepared"] == [] and again["skipped"] == ["MSCOCO", "NIGHTS"]
    assert (out / "MSCOCO.jsonl").stat().st_mtime_ns == mtime

    # A run killed in the middle of a data set leaves its temp file and no manifest entry: not done.
    real = mmeb_prepare._ROW_BUILDERS["mmeb_train"]
    calls = []

    def killed(record, job, ctx):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(record, job, ctx)

    monkeypatch.setitem(mmeb_prepare._ROW_BUILDERS, "mmeb_train", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, out, only="CIRR", progress=False)
    monkeypatch.setitem(mmeb_prepare._ROW_BUILDERS, "mmeb_train", real)
    assert (out / "CIRR.jsonl.partial").is_file() and not (out / "CIRR.jsonl").exists()
    assert "CIRR" not in json.loads((out / "manifest.json").read_text())["datasets"]
    # A finished file the manifest does not record (killed before the manifest was written) is not done either.
    (out / "VOC2007.jsonl").write_text("not rows\n")
    report = prepare(root, out, only="CIRR,MSCOCO,VOC2007", progress=False)
    assert report["prepared"] == ["CIRR", "VOC2007"] and report["skipped"] == ["MSCOCO"]
    assert not (out / "CIRR.jsonl.partial").exists()
    assert len(read_mmeb_train(out / "CIRR.jsonl", out, media_roots=[root])) == counts["CIRR"]
    assert len(read_mmeb_train(out / "VOC2007.jsonl", out, media_roots=[root])) == counts["VOC2007"]

    # Other settings are not the same data set: a cap, another split, --overwrite prepare again.
    capped = prepare(root, out, only="MSCOCO", caps="MSCOCO=1", progress=False)
    assert capped["prepared"] == ["MSCOCO"] and capped["manifest"]["datasets"]["MSCOCO"]["cap"] == 1
    assert len(read_mmeb_train(out / "MSCOCO.jsonl", out, media_roots=[root])) == 1
    diverse = prepare(root, out, only="MSCOCO_t2i", mmeb_split="diverse_instruction", progress=False)
    assert diverse["manifest"]["datasets"]["MSCOCO_t2i"]["split"] == "diverse_instruction"
    t2i = read_mmeb_train(out / "MSCOCO_t2i.jsonl", out, media_roots=[root])
    assert t2i[0].query.text.startswith("Retrieve a photo")
    assert prepare(root, out, only="NIGHTS", overwrite=True, progress=False)["prepared"] == ["NIGHTS"]
    none = prepare(root, out, only="N24News", negatives="none", progress=False)
    assert all(r.negative is None for r in read_mmeb_train(out / "N24News.jsonl", out, media_roots=[root]))
    assert none["manifest"]["datasets"]["N24News"]["negatives"] == "none"


def test_caps_option():
    assert parse_caps("none") == {} and parse_caps(None) == {}
    assert parse_caps("vlm2vec") == VLM2VEC_CAPS and VLM2VEC_CAPS["MSCOCO_i2t"] == 120_000
    assert parse_caps("vlm2vec,ImageNet_1K=5")["ImageNet_1K"] == 5
    with pytest.raises(ValueError, match="--caps"):
        parse_caps("ImageNet=5")


def _mmeb_root(tmp_path: Path, rows: list[dict], split: str = "train") -> Path:
    root = tmp_path / "root"
    folder = root / "TIGER-Lab" / "MMEB-train" / "ImageNet_1K"
    folder.mkdir(parents=True)
    image = root / "TIGER-Lab" / "MMEB-train" / "images" / "ImageNet_1K" / "Train" / "image_0.jpg"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"")
    columns = fixture.MMEB_COLUMNS
    table = pa.Table.from_pylist([{c: r.get(c, "") for c in columns} for r in rows],
                                 schema=pa.schema([(c, pa.string()) for c in columns]))
    pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    return root


GOOD = {"qry": fixture.IMAGENET_QUERY, "qry_image_path": "images/ImageNet_1K/Train/image_0.jpg", "pos_text": "plane"}


def test_bad_rows_name_file_row_and_field(download, tmp_path, capsys):
    root = _mmeb_root(tmp_path, [GOOD, {**GOOD, "qry_image_path": "images/ImageNet_1K/Train/image_1.jpg"}])
    with pytest.raises(ValueError, match=r"ImageNet_1K/train-00000-of-00001\.parquet: row 2: field 'qry_image_path': "
                                         r"image file not found"):
        prepare(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "ImageNet_1K.jsonl.partial").exists()
    root = _mmeb_root(tmp_path / "b", [GOOD, {**GOOD, "qry": "Represent the given image"}])
    with pytest.raises(ValueError, match=r"row 2: field 'qry': .*holds 0 <\|image_1\|> placeholders"):
        prepare(root, tmp_path / "out_b", progress=False)
    # Empty sides: an error outside A-OKVQA / OK-VQA in the authors' style, dropped in VLM2Vec's.
    root = _mmeb_root(tmp_path / "c", [GOOD, {**GOOD, "pos_text": ""}])
    with pytest.raises(ValueError, match=r"row 2: field 'pos_text': the side has no text and no image"):
        prepare(root, tmp_path / "out_c", progress=False)
    v = prepare(root, tmp_path / "out_c", prompt_style="vlm2vec", progress=False)["manifest"]["datasets"]
    assert v["ImageNet_1K"]["rows_written"] == 1 and v["ImageNet_1K"]["rows_skipped"]

    # A LLaVA-Hound row without its conversation, through the command line.
    video = tmp_path / "d" / "ShareGPTVideo" / "train_video_and_instruction"
    (video / "video_instruction" / "train" / "sft").mkdir(parents=True)
    (video / "train_300k").mkdir()
    rows = fixture.caption_rows()[:1] + [{"id": "x", "video": "v_x"}]
    (video / "video_instruction" / "train" / "sft" / "video_caption_300k.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert cli.main(["data", "prepare", "--root", str(tmp_path / "d"), "--only", "video_caption_300k",
                     "--no-progress"]) == 2
    assert "video_caption_300k.jsonl: row 2: field 'conversations'" in capsys.readouterr().err


def test_missing_sets_and_split_fallback(tmp_path, capsys):
    root = _mmeb_root(tmp_path, [GOOD], split="original")  # a snapshot without `train`
    report = prepare(root, tmp_path / "out", progress=False)
    assert report["prepared"] == ["ImageNet_1K"] and set(report["missing"]) == set(DATASETS) - {"ImageNet_1K"}
    entry = report["manifest"]["datasets"]["ImageNet_1K"]
    assert entry["split"] == "original" and any("no train-00000-of-00001.parquet" in w for w in entry["warnings"])
    assert set(report["manifest"]["missing"]) == set(report["missing"])
    assert "warning" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="colpali_train_set"):
        prepare(root, tmp_path / "out", only="ImageNet_1K,colpali_train_set", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to prepare"):
        prepare(tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match="unknown data set"):
        prepare(root, only="ImageNet", progress=False)


def test_training_refuses_another_prompt_style(download, prepared):
    out = prepared["btoks"]
    spec = DatasetSpec(name="MSCOCO", path=str(out / "MSCOCO.jsonl"), image_root=str(out),
                       media_roots=(str(download[0]),))
    with pytest.raises(ValueError, match=r"prepared in prompt style 'btoks'.*data\.prompt_style is 'vlm2vec'"):
        open_rows(spec, "vlm2vec")
    assert len(open_rows(spec, "btoks")) == 2 and len(open_rows(spec, "mmeb")) == 2
    with pytest.raises(ValueError, match=r"'vlm2vec'.*'btoks'"):
        read_mmeb_train(prepared["vlm2vec"] / "MSCOCO.jsonl", prepared["vlm2vec"])


def test_tfds_copy(download, tmp_path):
    from btoks_jax.data.tfds_mmeb import read_tfds

    root, counts = download
    out = tmp_path / "out"
    report = prepare(root, out, only="VisDial", tfds=True, progress=False)
    assert report["manifest"]["datasets"]["VisDial"]["tfds"]["complete"]
    rows = read_tfds(out / "tfds", "VisDial")
    assert len(rows) == counts["VisDial"]
    want_rows = read_mmeb_train(out / "VisDial.jsonl", out, media_roots=[root])
    for got, want in zip((rows[i] for i in range(len(rows))), want_rows):
        assert _texts(got) == _texts(want)
        assert got.positive.image == Path(want.positive.image).read_bytes()
    assert prepare(root, out, only="VisDial", tfds=True, progress=False)["skipped"] == ["VisDial"]
    from btoks_jax.data.tfds_mmeb import BUILDER_NAME

    assert (out / "tfds" / BUILDER_NAME / "VisDial").is_dir() and BUILDER_NAME == mmeb_prepare.TFDS_BUILDER
    prepare(root, out, only="VisDial", overwrite=True, progress=False)  # new rows: the old copy goes
    assert not (out / "tfds" / BUILDER_NAME / "VisDial").exists()
    assert "tfds" not in json.loads((out / "manifest.json").read_text())["datasets"]["VisDial"]


def test_cli_data_subcommands(tmp_path):
    parser = cli.build_parser()
    plain = parser.parse_args(["data", "--out", "x", "--seed", "3"])
    emoji = parser.parse_args(["data", "emoji", "--out", "y", "--seed", "2"])
    assert plain.fn is emoji.fn is cli._data and (plain.out, plain.seed, emoji.out, emoji.seed) == ("x", 3, "y", 2)
    args = parser.parse_args(["data", "prepare", "--root", "r", "--only", "CIRR", "--caps", "vlm2vec", "--tfds"])
    assert args.fn is cli._data_prepare and (args.root, args.prepare_out, args.only, args.tfds) == ("r", "", "CIRR",
                                                                                                    True)
    assert args.prompt_style == "btoks" and args.mmeb_split == "auto" and args.negatives == "authors"
