"""The 36 MMEB-V2 image readers on a miniature of the published files, in both prompt styles.

Expected strings: the first query and first candidate of every set as the authors' audit tests record them on the
real data, in "origin" mode (= VLM2Vec's parsers) and in their default "canonical" mode
(`tests/evaluate/test_mmeb_image_group_a_audit.py`, `tests/evaluate/test_mmeb_image_group_b_audit.py` of
siryuson/BottleneckTokens), which also hold the "Resulting forms" of shared/MMEB_FORMATS.md section 2.1; and the
edge cases of their runtime tests (`tests/evaluate/test_retrieval_runtime_transform.py`). They are compared after
`item_prompt`, i.e. as the model reads them; the authors' strings carry bare pads, which their processor wraps in
vision markers afterwards, as the "btoks" style does here.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mmeb_fixtures import image as fx

from btoks_jax.api import item_prompt
from btoks_jax.evaluate.mmeb import MMEB_V2_DATASETS, Item
from btoks_jax.evaluate.published.common import MissingData
from btoks_jax.evaluate.published.image import PARSER_OF, PARSERS, TASKS

PAD = "<|image_pad|>"
WRAPPED = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_NAMES = [spec.name for spec in MMEB_V2_DATASETS if spec.modality == "image"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb_v2")
    return root, fx.write(root)


def load(root, name, style):
    return TASKS[name](root, style, root / "media")


def as_btoks(text: str) -> str:
    return text.replace(PAD, WRAPPED)


# (set, origin query, origin first candidate, canonical query, canonical first candidate); None: same as origin.
# Group A audit (image_cls, image_qa): origin == canonical for every set.
GROUP_A = {
    "HatefulMemes": ("<|image_pad|>\nRepresent the given image for binary classification to determine whether it "
                     "constitutes hateful speech or not\n", "Yes"),
    "VOC2007": ("<|image_pad|>\nIdentify the object shown in the image\n", "chair"),
    "SUN397": ("<|image_pad|>\nIdentify the scene shown in the image\n", "firing range indoor"),
    "Place365": ("<|image_pad|>\nIdentify the scene shown in the image\n", "berth"),
    "ImageNet-A": ("<|image_pad|>\nRepresent the given image for classification\n", "Rottweiler"),
    "ImageNet-R": ("<|image_pad|>\nRepresent the given image for classification\n", "flute"),
    "ObjectNet": ("<|image_pad|>\nIdentify the object shown in the image\n", "tray"),
    "Country211": ("<|image_pad|>\nIdentify the country depicted in the image\n", "Fiji"),
    "N24News": ("<|image_pad|>\nRepresent the given news image with the following caption for domain "
                "classification: Anthony Pidgeon\n", "Travel"),
    "ImageNet-1K": ("<|image_pad|>\nRepresent the given image for classification\n", "coucal"),
    "VizWiz": ("<|image_pad|>\nRepresent the given image with the following question: Can you tell me what this "
               "medicine is please?\n", "night time"),
    "ChartQA": ("<|image_pad|>\nRepresent the given image with the following question: How many food item is shown "
                "in the bar graph?\n", "14"),
    "ScienceQA": ("<|image_pad|>\nRepresent the given image with the following question: Which of the following could "
                  "Gordon's test show?\n", "how steady a parachute with a 1 m vent was at 200 km per hour"),
    "GQA": ("<|image_pad|>\nRepresent the given image with the following question: What is this bird called?\n",
            "This is a parrot."),
    "A-OKVQA": ("<|image_pad|>\nRepresent the given image with the following question: What is in the "
                "motorcyclist's mouth?\n", "cigarette"),
    "DocVQA": ("<|image_pad|>\nRepresent the given image with the following question: What is the ‘actual’ value "
               "per 1000, during the year 1975?\n", "0.28"),
    "InfographicsVQA": ("<|image_pad|>\nRepresent the given image with the following question: Which social platform "
                        "has heavy female audience?\n", "pinterest"),
    "Visual7W": ("<|image_pad|>\nRepresent the given image with the following question: What color is the "
                 "sidewalk?\n", "Gray."),
    "TextVQA": ("<|image_pad|>\nRepresent the given image with the following question: what is the brand of this "
                "camera?\n", "dakota"),
    "OK-VQA": ("<|image_pad|>\nRepresent the given image with the following question: What sport can you use this "
               "for?\n", "race"),
}

_VISDIAL = ("Q:is the photo in color\nA:yes\nQ:is it a professional photo\nA:no\nQ:is it well lit\nA:no\n"
            "Q:is it daytime\nA:i don't see windows\nQ:does this look like an adults bedroom\nA:maybe\n"
            "Q:is the room clean\nA:no\nQ:can you tell what kind of computer it is\nA:no not really\n"
            "Q:is it a flat screen\nA:yes\nQ:what's the desk made out of\nA:cheap plastic or wood\n"
            "Q:is there a computer chair\nA:yes\n")
_WEBQA_CANDIDATE = (
    "<|image_pad|>\nRepresent the given Wikipedia image with related text information: 2020-05-08 15 17 05 Minnetonka "
    "Rhododendron flower along Tranquility Court in the Franklin Farm section of Oak Hill, Fairfax County, Virginia "
    "Minnetonka Rhododendron flower along Tranquility Court in the Franklin Farm section of Oak Hill, Fairfax County, "
    "Virginia.\n")
_OVEN_CANDIDATE = (
    "<|image_pad|>\nRepresent the given Wikipedia image with related text information: Titisee. The Titisee is a lake "
    "in the southern Black Forest in Baden-Württemberg. It covers an area of 1.3 (km2) and is an average of 20 (m) "
    "deep. It owes its formation to the Feldberg glacier, the moraines of which were formed in the Pleistocene epoch "
    "and nowadays form the shores of the lake. The lake's outflow, at 840 (m) above sea level, is the River Gutach, "
    "which merges with the Haslach stream below Kappel to form the Wutach. The waters of the Titisee thus drain "
    "eventually into the Upper Rhine between Tiengen and Waldshut. On the north shore lies the.\n")
_CROPPED_ORIGIN = "<|image_pad|>\nRepresent the given cropped image of the object"
_CROPPED_CANONICAL = "<|image_pad|>\nRepresent the given cropped image of the object.\n"

# Group B audit (image_i2t, image_t2i, image_i2i_vg).
GROUP_B = {
    "MSCOCO_i2t": ("<|image_pad|>\nFind an image caption describing the given everyday image.\n",
                   "A man with a red helmet on a small moped on a dirt road.", None, None),
    "VisualNews_i2t": ("<|image_pad|>\nFind a caption for the news in the given photo.\n",
                       "Indian National Congress Vice President Rahul Gandhi addresses the special plenary session of "
                       "Confederation of Indian Industr in New Delhi on April 4 2013.", None, None),
    "VisualNews_t2i": ("Retrieve an image of this news caption. Indian National Congress Vice President Rahul Gandhi "
                       "addresses the special plenary session of Confederation of Indian Industr in New Delhi on April "
                       "4 2013.\n", "<|image_pad|>\nRepresent the given image.\n", None, None),
    "Wiki-SS-NQ": ("Find the document image that can answer the given query: who needs to know about the jet stream\n",
                   "<|image_pad|>\nRepresent the given image\n", None, None),
    "EDIS": ("Find a news image that matches the provided caption: Former Israeli president and prime minister Shimon "
             "Peres right and Palestinian President Mahmoud Abbas arrive at the World Economic Forum in Southern "
             "Shuneh Jordan in May 2015.\n",
             "<|image_pad|>\nRepresent the given image with related text information: WorldAs the West pays tribute "
             "to Peres, many Arabs recall a legacy of destruction.\n", None, None),
    "WebQA": ("Find a Wikipedia image that answers this question: Does a Minnetonka Rhododendron flower have petals in "
              "a cup shape?\n", _WEBQA_CANDIDATE, None, None),
    "MSCOCO_t2i": ("Find me an everyday image that matches the given caption: A man with a red helmet on a small "
                   "moped on a dirt road.\n", "<|image_pad|>\nRepresent the given image.\n", None, None),
    "VisDial": ("Represent the given dialogue about an image, which is used for image retrieval: " + _VISDIAL + "\n",
                "<|image_pad|>\nRepresent the given image\n",
                "Represent the given dialogue about an image, which is used for image retrieval:\n" + _VISDIAL, None),
    "NIGHTS": ("<|image_pad|>\nFind a day-to-day image that looks similar to the provided image.\n",
               "<|image_pad|>\nRepresent the given image.\n", None, None),
    "OVEN": ("<|image_pad|>\nRetrieve a Wikipedia image-description pair that provides evidence for the question of "
             "this image: What is the name of this place?\n", _OVEN_CANDIDATE, None, None),
    "FashionIQ": ("<|image_pad|>\nFind an image to match the fashion image and style note: Is shiny and silver with "
                  "shorter sleeves and fit and flare.\n", "<|image_pad|>\nRepresent the given image.\n", None, None),
    "CIRR": ("<|image_pad|>\nGiven an image, find a similar everyday image with the described changes: Show three "
             "bottles of soft drink.\n", "<|image_pad|>\nRepresent the given image.\n", None, None),
    "Visual7W-Pointing": ("<|image_pad|>\nSelect the portion of the image that answers the question \"Which box "
                          "frames the toilet?\"\n", _CROPPED_ORIGIN, None, _CROPPED_CANONICAL),
    "MSCOCO": ("<|image_pad|>\nCrop the image to to isolate the object labeled as \"dog\"\n", _CROPPED_ORIGIN, None,
               _CROPPED_CANONICAL),
    "RefCOCO": ("<|image_pad|>\nSelect the portion of the image that follows the language expressions. \"bowl behind "
                "the others can only see part\"\n", _CROPPED_ORIGIN, None, _CROPPED_CANONICAL),
    "RefCOCO-Matching": ("<|image_pad|>\nSelect the portion of the image that follows the language expressions: "
                         "\"bowl behind the others can only see part\"\n",
                         "<|image_pad|>\nSelect the portion of the image that follows the language expressions: "
                         "\"Dish in top right corner\"\n", None, None),
}

EXPECTED = {name: (query, candidate, query, candidate) for name, (query, candidate) in GROUP_A.items()}
EXPECTED.update({name: (q, c, q if cq is None else cq, c if cc is None else cc)
                 for name, (q, c, cq, cc) in GROUP_B.items()})


def test_expectations_cover_every_set():
    assert sorted(EXPECTED) == sorted(IMAGE_NAMES) == sorted(TASKS) == sorted(PARSER_OF)


def check_first_row(root, name, style):
    origin_query, origin_candidate, canonical_query, canonical_candidate = EXPECTED[name]
    row = load(root, name, style).rows[0]
    if style == "vlm2vec":
        assert item_prompt(row.query, style) == origin_query
        assert item_prompt(row.candidates[0], style) == origin_candidate
    else:
        assert item_prompt(row.query, style) == as_btoks(canonical_query)
        assert item_prompt(row.candidates[0], style) == as_btoks(canonical_candidate)
    assert row.query.instruction == "" and all(c.instruction == "" for c in row.candidates)


@pytest.mark.parametrize("style", ["vlm2vec", "btoks"])
@pytest.mark.parametrize("name", PARSERS["image_cls"])
def test_image_cls_prompts(published, name, style):
    check_first_row(published[0], name, style)


@pytest.mark.parametrize("style", ["vlm2vec", "btoks"])
@pytest.mark.parametrize("name", PARSERS["image_qa"])
def test_image_qa_prompts(published, name, style):
    check_first_row(published[0], name, style)


def test_image_qa_vizwiz_trailing_space(published):
    # test_retrieval_eval_dataset_vizwiz_canonical_normalizes_query_whitespace_only: origin keeps the space before
    # the final newline (VLM2Vec's fix runs before that newline is appended), canonical drops it.
    root = published[0]
    origin = "Represent the given image with the following question: What is the title of this book? \n"
    assert item_prompt(load(root, "VizWiz", "vlm2vec").rows[1].query, "vlm2vec") == PAD + "\n" + origin
    assert item_prompt(load(root, "VizWiz", "btoks").rows[1].query, "btoks") == \
        WRAPPED + "\nRepresent the given image with the following question: What is the title of this book?\n"


def test_image_qa_ok_vqa_blank_candidates(published):
    # VLM2Vec keeps the blank answer as a candidate; the authors' converter drops blank OK-VQA candidates
    # (`_validate_text_candidate_groups`).
    root = published[0]
    assert [c.text for c in load(root, "OK-VQA", "vlm2vec").rows[0].candidates] == ["race", "bake it", "", "surf"]
    row = load(root, "OK-VQA", "btoks").rows[0]
    assert [c.text for c in row.candidates] == ["race", "bake it", "surf"]
    assert row.relevance == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("style", ["vlm2vec", "btoks"])
@pytest.mark.parametrize("name", PARSERS["image_i2t"])
def test_image_i2t_prompts(published, name, style):
    check_first_row(published[0], name, style)


@pytest.mark.parametrize("style", ["vlm2vec", "btoks"])
@pytest.mark.parametrize("name", PARSERS["image_t2i"])
def test_image_t2i_prompts(published, name, style):
    check_first_row(published[0], name, style)
    row = load(published[0], name, style).rows[0]
    assert row.query.image is None and all(c.image for c in row.candidates)


@pytest.mark.parametrize("style", ["vlm2vec", "btoks"])
@pytest.mark.parametrize("name", PARSERS["image_i2i_vg"])
def test_image_i2i_vg_prompts(published, name, style):
    check_first_row(published[0], name, style)
    row = load(published[0], name, style).rows[0]
    assert row.query.image and all(c.image for c in row.candidates)


def test_resulting_forms_of_the_format_notes(published):
    # shared/MMEB_FORMATS.md 2.1, "Resulting forms" (VLM2Vec): VisDial's query ends in a blank line, the cropped-object
    # candidates have no final newline.
    root = published[0]
    assert item_prompt(load(root, "VisDial", "vlm2vec").rows[0].query).endswith("A:yes\n\n")
    for name in ("MSCOCO", "RefCOCO", "Visual7W-Pointing"):
        for candidate in load(root, name, "vlm2vec").rows[0].candidates:
            assert item_prompt(candidate) == "<|image_pad|>\nRepresent the given cropped image of the object"


@pytest.mark.parametrize("style", ["vlm2vec", "btoks"])
def test_all_sets_read_with_counts_relevance_and_images(published, style):
    root, counts = published
    assert sorted(counts) == sorted(IMAGE_NAMES)
    for name in IMAGE_NAMES:
        task = load(root, name, style)
        parser = PARSER_OF[name]
        assert task.name == name and task.ranking == "local" and len(task.rows) == counts[name] == 3
        raw = fx.records(root, name)
        for row, record in zip(task.rows, raw):
            n = len(record["tgt_text"])
            if style == "btoks" and name == "OK-VQA":
                n -= sum(not t.strip() for t in record["tgt_text"])
            assert len(row.candidates) == len(row.relevance) == n
            assert row.relevance == (1.0,) + (0.0,) * (n - 1)
            if parser == "image_t2i":
                assert row.query.image is None
            else:
                assert os.path.isabs(row.query.image) and os.path.isfile(row.query.image)
                assert row.query.image.endswith(record["qry_img_path"])
            for candidate, path in zip(row.candidates, record["tgt_img_path"]):
                if parser in ("image_cls", "image_qa", "image_i2t"):
                    assert candidate.image is None
                else:
                    assert os.path.isabs(candidate.image) and os.path.isfile(candidate.image)
                    assert candidate.image == os.path.join(os.path.abspath(root / fx.IMAGE_ROOT), path)
                assert candidate.video is None


def test_equal_candidate_names_are_equal_items(published):
    root = published[0]
    # WebQA names candidates by image path: c1 comes back in row 2 with another caption; the first one wins.
    webqa = load(root, "WebQA", "vlm2vec").rows
    assert webqa[1].candidates[1] is webqa[0].candidates[1]
    assert "(a second caption" not in webqa[1].candidates[1].text
    # RefCOCO-Matching names them path + ":" + caption without quotes: "Dish in top right corner" unquoted in row 2
    # is the quoted candidate of row 1; two captions of the same image stay two candidates.
    matching = load(root, "RefCOCO-Matching", "btoks").rows
    assert matching[1].candidates[1] is matching[0].candidates[0]
    assert matching[0].candidates[0].image == matching[0].candidates[1].image
    assert matching[0].candidates[0] != matching[0].candidates[1]
    assert matching[1].candidates[0] is matching[0].candidates[1]
    # VisDial: shared images, one Item each.
    visdial = load(root, "VisDial", "vlm2vec").rows
    assert visdial[1].candidates[1] is visdial[0].candidates[0]
    assert len({c for row in visdial for c in row.candidates}) == 5
    # Text candidates are named by their text.
    imagenet = load(root, "ImageNet-1K", "vlm2vec").rows
    assert imagenet[0].candidates[1] == imagenet[1].candidates[0] == Item(text="Italian greyhound")


def test_fixture_schema_and_determinism(published, tmp_path):
    root, _ = published
    file = fx.annotation_file(root, "WebQA")
    assert file.relative_to(root).as_posix() == "ziyjiang/MMEB_Test_Instruct/WebQA/test-00000-of-00001.parquet"
    schema = pq.read_schema(file)
    assert schema.names == ["qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path"]
    assert [schema.field(n).type for n in schema.names] == [pa.string()] * 4 + [pa.list_(pa.string())] * 2

    def digest(folder):
        h = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
        return h.hexdigest()

    fx.write(tmp_path)
    assert digest(tmp_path / fx.IMAGE_ROOT) == digest(root / fx.IMAGE_ROOT)
    assert digest(tmp_path / fx.ANNOTATIONS) == digest(root / fx.ANNOTATIONS)


def test_missing_sets_raise_missing_data(published, tmp_path):
    for name in ("ImageNet-1K", "VisDial", "MSCOCO"):
        with pytest.raises(MissingData):
            load(tmp_path, name, "vlm2vec")
    # annotations without images, and one set's annotations removed
    shutil.copytree(published[0] / fx.ANNOTATIONS, tmp_path / fx.ANNOTATIONS)
    (tmp_path / "TIGER-Lab/MMEB-V2/image-tasks").mkdir(parents=True)
    with pytest.raises(MissingData, match="mmeb_v1.tar.gz"):
        load(tmp_path, "CIRR", "btoks")
    shutil.copytree(published[0] / fx.IMAGE_ROOT, tmp_path / fx.IMAGE_ROOT)
    shutil.rmtree(tmp_path / fx.ANNOTATIONS / "CIRR")
    with pytest.raises(MissingData, match="CIRR"):
        load(tmp_path, "CIRR", "btoks")
    assert len(load(tmp_path, "NIGHTS", "btoks").rows) == 3


def test_vlm2vec_moved_image_layout(published, tmp_path):
    # VLM2Vec's download script moves image-tasks/MMEB/* up to image-tasks/.
    shutil.copytree(published[0] / fx.ANNOTATIONS, tmp_path / fx.ANNOTATIONS)
    shutil.copytree(published[0] / fx.IMAGE_ROOT / "OVEN", tmp_path / "TIGER-Lab/MMEB-V2/image-tasks/OVEN")
    row = load(tmp_path, "OVEN", "vlm2vec").rows[0]
    assert row.query.image == os.path.join(os.path.abspath(tmp_path / "TIGER-Lab/MMEB-V2/image-tasks"),
                                           "OVEN/Test/query_0.jpg")


def at(file) -> str:
    return re.escape(str(file))


def test_bad_fields_raise_value_error_naming_file_row_and_field(published, tmp_path):
    root = tmp_path
    shutil.copytree(published[0] / fx.IMAGE_ROOT, root / fx.IMAGE_ROOT)
    rows = fx.records(root, "WebQA")
    wrong = pa.schema([(f.name, pa.string()) if f.name == "tgt_text" else f for f in fx.schema()])
    rows = [dict(r, tgt_text=r["tgt_text"][0]) for r in rows]
    file = fx.write_table(fx.annotation_file(root, "WebQA"), rows, wrong)
    with pytest.raises(ValueError, match=at(file) + r": row 1: field 'tgt_text': expected list, got str"):
        load(root, "WebQA", "vlm2vec")

    rows = fx.records(root, "MSCOCO")
    rows[1]["tgt_img_path"][2] = "MSCOCO/Test/absent.jpg"
    file = fx.write_table(fx.annotation_file(root, "MSCOCO"), rows)
    with pytest.raises(ValueError, match=at(file) + r": row 2: field 'tgt_img_path': entry 3: image file not "
                                                    r"found: .*absent\.jpg"):
        load(root, "MSCOCO", "btoks")

    rows = fx.records(root, "DocVQA")
    (root / fx.IMAGE_ROOT / rows[2]["qry_img_path"]).unlink()
    file = fx.write_table(fx.annotation_file(root, "DocVQA"), rows)
    with pytest.raises(ValueError, match=at(file) + r": row 3: field 'qry_img_path': image file not found"):
        load(root, "DocVQA", "vlm2vec")

    rows = fx.records(root, "CIRR")
    rows[0]["tgt_img_path"] = rows[0]["tgt_img_path"][:-1]
    file = fx.write_table(fx.annotation_file(root, "CIRR"), rows)
    with pytest.raises(ValueError, match=at(file) + r": row 1: field 'tgt_img_path': 3 entries but tgt_text has 4"):
        load(root, "CIRR", "vlm2vec")

    rows = fx.records(root, "ChartQA")
    rows[0]["tgt_text"] = ["", "14"]
    file = fx.write_table(fx.annotation_file(root, "ChartQA"), rows)
    load(root, "ChartQA", "vlm2vec")  # VLM2Vec embeds a blank candidate; the authors' converter rejects it
    with pytest.raises(ValueError, match=at(file) + r": row 1: field 'tgt_text': entry 1 is blank"):
        load(root, "ChartQA", "btoks")

    file = fx.write_table(fx.annotation_file(root, "GQA"), [{k: v for k, v in r.items() if k != "qry_text"}
                                                            for r in fx.records(root, "GQA")],
                          pa.schema([f for f in fx.schema() if f.name != "qry_text"]))
    with pytest.raises(ValueError, match=at(file) + r": missing column\(s\) \['qry_text'\]"):
        load(root, "GQA", "vlm2vec")

    with pytest.raises(ValueError, match="prompt style"):
        load(published[0], "GQA", "mmeb")


OLD_SCHEMA = pa.schema([("qry_text", pa.string()), ("qry_img_path", pa.string()), ("tgt_text", pa.list_(pa.string())),
                        ("tgt_img_path", pa.list_(pa.string()))])


def test_older_mmeb_eval_shape(published, tmp_path):
    # TIGER-Lab/MMEB-eval: the finished prompts in qry_text / tgt_text. Strings from the authors' runtime tests:
    # test_group_b_visdial_canonical_candidate_enforces_block_layout,
    # test_retrieval_eval_dataset_visdial_modes_produce_different_query_text,
    # test_retrieval_eval_dataset_image_t2i_text_only_query_alignment_applies_to_origin_and_canonical,
    # test_retrieval_eval_dataset_vizwiz_canonical_normalizes_query_whitespace_only.
    root = tmp_path
    shutil.copytree(published[0] / fx.IMAGE_ROOT, root / fx.IMAGE_ROOT)
    old = root / "TIGER-Lab/MMEB-eval"
    visdial = fx.records(root, "VisDial")[0]["tgt_img_path"][:2]
    fx.write_table(old / "VisDial/test-00000-of-00001.parquet", [
        {"qry_text": "Question with preserved blank line.\n\n", "qry_img_path": "",
         "tgt_text": ["<|image_1|> Represent the given image.\n"] * 2, "tgt_img_path": visdial}], OLD_SCHEMA)
    webqa = fx.records(root, "WebQA")[0]["tgt_img_path"][:1]
    fx.write_table(old / "WebQA/test-00000-of-00001.parquet", [
        {"qry_text": "<|image_1|>\nFind a Wikipedia image that answers this question.\n", "qry_img_path": "",
         "tgt_text": ["<|image_1|>\nRepresent the given Wikipedia image.\n"], "tgt_img_path": webqa}], OLD_SCHEMA)
    vizwiz = fx.records(root, "VizWiz")[0]["qry_img_path"]
    fx.write_table(old / "VizWiz/test-00000-of-00001.parquet", [
        {"qry_text": "<|image_1|>\nRepresent the given image with the following question: What is the title of this "
                     "book? \n", "qry_img_path": vizwiz, "tgt_text": ["book title", "dog years"],
         "tgt_img_path": ["", ""]}], OLD_SCHEMA)

    origin, canonical = (load(root, "VisDial", s).rows[0] for s in ("vlm2vec", "btoks"))
    assert origin.query.text == "Question with preserved blank line.\n\n"
    assert canonical.query.text == "Question with preserved blank line.\n"
    assert item_prompt(origin.candidates[0], "vlm2vec") == PAD + " Represent the given image.\n"
    assert item_prompt(canonical.candidates[0], "btoks") == WRAPPED + "\nRepresent the given image.\n"
    assert origin.relevance == (1.0, 0.0)

    for style in ("vlm2vec", "btoks"):
        row = load(root, "WebQA", style).rows[0]
        assert item_prompt(row.query, style) == "Find a Wikipedia image that answers this question.\n"
        assert item_prompt(row.candidates[0], style) == \
            (PAD if style == "vlm2vec" else WRAPPED) + "\nRepresent the given Wikipedia image.\n"

    question = "\nRepresent the given image with the following question: What is the title of this book?"
    assert item_prompt(load(root, "VizWiz", "vlm2vec").rows[0].query, "vlm2vec") == PAD + question + " \n"
    assert item_prompt(load(root, "VizWiz", "btoks").rows[0].query, "btoks") == WRAPPED + question + "\n"
    assert [c.text for c in load(root, "VizWiz", "btoks").rows[0].candidates] == ["book title", "dog years"]
