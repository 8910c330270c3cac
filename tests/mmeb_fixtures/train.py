"""The training download of the headline mixture as a miniature, in the published layout and arrow types.

`write(root)` lays out what `hf download <owner>/<name> --repo-type dataset --local-dir root/<owner>/<name>`
leaves once the archives are extracted in place (the archives themselves are not written; nothing reads them):

- `TIGER-Lab/MMEB-train/<Subset>/{original,diverse_instruction,train}-00000-of-00001.parquet` for the 20
  subsets, every column a string with "" for absent (qry, qry_image_path, pos_text, pos_image_path, neg_text,
  neg_image_path), `train` equal to `original`, `diverse_instruction` with reworded instructions; images under
  `TIGER-Lab/MMEB-train/images/<Subset>/Train/`, row paths starting `images/`. The first rows carry the
  published first-row texts where they are known (ImageNet_1K, ChartQA, MSCOCO_t2i, WebQA, VisDial, MSCOCO,
  OK-VQA's `husky` negative), the others plausible texts of the same shape. Special cases: WebQA queries with
  the image placeholder but no image, VisDial's image-only negatives, an image path with a space (MSCOCO), an
  A-OKVQA row with an empty positive side, ChartQA answers with trailing spaces.
- `vidore/colpali_train_set/data/train-0000N-of-00082.parquet` (3 of the 82 shards) and
  `data/test-00000-of-00001.parquet`: image struct<bytes: binary, path: string>, image_filename, query,
  answer, source, options, page, model, prompt, answer_type (nullable strings), sources arxiv_qa (with
  options), pdf, docvqa (image path null; two rows share one page).
- `openbmb/VisRAG-Ret-Train-In-domain-data/data/train-0000N-of-00002.parquet`: query, image struct, source, over
  five sources (two rows share a page).
- `ShareGPTVideo/train_video_and_instruction/video_instruction/train/sft/{video_caption_300k,
  video_240k_caption_15k}.jsonl` rows {id, video, conversations: [{from, value}]} (human turn starting
  `<video>\\n`) and frame folders `train_300k/<video>/c01_0001.jpeg`-style: two videos with more than 8
  frames, one with 5, one with none.

Images are tiny (28-56 px) Pillow drawings, JPEG or PNG; everything is seeded, so two calls write identical
files. Returns {prepared data set name: rows expected in it} (the same for both prompt styles).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MMEB_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
T = "<|image_1|>"

# ---- texts used by the tests (the published first rows where known)
IMAGENET_QUERY = f"{T}\nRepresent the given image for classification\n"
IMAGENET_POSITIVE = "plane, carpenter's plane, woodworking plane"
CHARTQA_QUERY = f"{T}\nRepresent the given image with the following question: Is the value of Favorable 38 in 2015?\n"
MSCOCO_T2I_QUERY = ("Find me an everyday image that matches the given caption: A teddy bear shop is equipped with a "
                    "door guard teddy and a neighbor teddy above.\n")
WEBQA_QUESTION = ("Find a Wikipedia image that answers this question: Which body part is found on both a 1913 D "
                  "Barber half and a 1914 Barber Quarter?")
WEBQA_QUERY = f"{T}\n{WEBQA_QUESTION}\n"
WEBQA_POSITIVE_BODY = "Represent the given Wikipedia image with related text information: 1913-D Barber half obverse."
VISDIAL_INSTRUCTION = "Represent the given dialogue about an image, which is used for image retrieval:"
VISDIAL_DIALOGUE = ("Q:is this a child or adult\nA:adult\nQ:male or female\nA:male\nQ:are they inside or outside\n"
                    "A:inside\nQ:what color is the dog\nA:tan")
VISDIAL_QUERY = f"{VISDIAL_INSTRUCTION} {VISDIAL_DIALOGUE}\n\n"
MSCOCO_QUERY = f'{T}\nSelect the portion of the image that isolates the object labeled as "hot dog"\n'
MSCOCO_POSITIVE = f"{T}\nRepresent the given cropped image of the object"
MSCOCO_CROP = "images/MSCOCO/Train/558840_object_hot dog.jpg"

CAPTION_PROMPT = "<video>\nWrite an in-depth depiction of the video, covering all its aspects."
VIDEOS = {  # video folder -> number of frames
    "v_--0edUL8zmA-Scene-001": 20,
    "v_0Ad3bOcIpkE-Scene-004": 12,
    "v_1qs3ieXHJ5s-Scene-002": 5,
    "v_2Fn9Uq8DvTE-Scene-010": 0,
}

COLPALI_OPTIONS = ("['A. The variance of the data decreases from panel a to panel d.', 'B. The variance of the data "
                   "increases from panel a to panel d.', 'C. The data presents no variance in any of the panels.', "
                   "'D. The variance of the data is inconsistent across the panels.', '-']")
COLPALI_PROMPT = ("\n        You are an assistant specialized in Multimodal RAG tasks.\n\n        The task is the "
                  "following: given an image from a pdf page, you will have to \n        generate questions that "
                  "can be asked by a user to retrieve information from \n        a large documentary corpus.\n\n")


def _seed(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name))


def _image(rng: random.Random, fmt: str = "JPEG", size: tuple[int, int] | None = None) -> bytes:
    from PIL import Image, ImageDraw

    width, height = size or (rng.randint(28, 56), rng.randint(28, 56))
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randrange(width - 4), rng.randrange(height - 4)
        draw.rectangle((x0, y0, x0 + rng.randint(2, 12), y0 + rng.randint(2, 12)),
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def _row(qry="", qry_image_path="", pos_text="", pos_image_path="", neg_text="", neg_image_path="") -> dict:
    return dict(qry=qry, qry_image_path=qry_image_path, pos_text=pos_text, pos_image_path=pos_image_path,
                neg_text=neg_text, neg_image_path=neg_image_path)


def _text(qry, qry_image_path, pos_text, neg_text="") -> dict:
    """A row whose positive (and negative) is text only."""
    return _row(qry, qry_image_path, pos_text, neg_text=neg_text)


def _question(q: str) -> str:
    return f"{T}\nRepresent the given image with the following question: {q}\n"


def mmeb_train_rows() -> dict[str, list[dict]]:
    """{subset: rows} with image paths relative to the repository root (`images/<Subset>/Train/...`)."""
    def img(subset, i):
        return f"images/{subset}/Train/{subset}_image_{i}.jpg"

    rows = {
        "ImageNet_1K": [_text(IMAGENET_QUERY, "images/ImageNet_1K/Train/image_0.jpg", IMAGENET_POSITIVE),
                        _text(IMAGENET_QUERY, "images/ImageNet_1K/Train/image_50000.jpg", "mountain tent"),
                        _text(IMAGENET_QUERY, "images/ImageNet_1K/Train/image_7.jpg", "golden retriever")],
        "N24News": [_text(f"{T}\nRepresent the given news image with the following caption for domain classification: "
                         "Danai Gurira and André Holland in a theater at New York University, where they met in the "
                         "Tisch Graduate Acting Program.\n", img("N24News", 0), "Theater", "Global Business"),
                    _text(f"{T}\nRepresent the given news image with the following caption for domain classification: "
                         "A chef plates a dish of spring vegetables.\n", img("N24News", 1), "Food", "Sports")],
        "HatefulMemes": [_text(f"{T}\nRepresent the given image for binary classification to determine whether it "
                              "constitutes hateful speech or not\n", img("HatefulMemes", i), a, b)
                         for i, (a, b) in enumerate((("Yes", "No"), ("No", "Yes")))],
        "VOC2007": [_text(f"{T}\nIdentify the object shown in the image\n", img("VOC2007", i), c)
                    for i, c in enumerate(("car", "dog"))],
        "SUN397": [_text(f"{T}\nIdentify the scene shown in the image\n", img("SUN397", 0), "abbey", "bakery"),
                   _text(f"{T}\nIdentify the scene shown in the image\n", img("SUN397", 1), "beach")],
        "OK-VQA": [_text(_question("What is the hairstyle of the blond called?"), img("OK-VQA", 0), "pony tail",
                        "husky"),
                   _text(_question("What sport can you use this for?"), img("OK-VQA", 1), "race", "swimming")],
        "A-OKVQA": [_text(_question("What is the man by the bags awaiting?"), img("A-OKVQA", 0), "cab", "train"),
                    _text(_question("What is the cat sitting on?"), img("A-OKVQA", 1), ""),  # empty positive
                    _text(_question("Which direction is the bus going?"), img("A-OKVQA", 2), "left", "up")],
        "DocVQA": [_text(_question("what is the date mentioned in this letter?"), img("DocVQA", 0), "1/8/93",
                        "398,627.92"),
                   _text(_question("what is the title of the table?"), img("DocVQA", 1), "SALES", "1/8/93")],
        "InfographicsVQA": [_text(_question("Which type of fonts offer better readability in printed works?"),
                                 img("InfographicsVQA", 0), "serif fonts", "his, he, hers"),
                            _text(_question("How many icons are shown?"), img("InfographicsVQA", 1), "4", "12")],
        "ChartQA": [_text(CHARTQA_QUERY, img("ChartQA", 0), "Yes", "No"),
                    _text(_question("What is the value of the tallest bar?"), img("ChartQA", 1), "10.5 ", "7.2 ")],
        "Visual7W": [_text(_question("What is written on the white square on the bus?"), img("Visual7W", 0),
                          "Fox's Ginger Biscuits.", "Mac's Macaroni Hut."),
                     _text(_question("Who is holding the umbrella?"), img("Visual7W", 1), "A woman.", "A child.")],
        "VisDial": [_row(VISDIAL_QUERY, "", f"{T}\nRepresent the given image\n", img("VisDial", 0), "",
                         img("VisDial", 61616)),
                    _row(f"{VISDIAL_INSTRUCTION} Q:does it look like inside a store\nA:no\n\n", "",
                         f"{T}\nRepresent the given image\n", img("VisDial", 61643), "", img("VisDial", 50556))],
        "CIRR": [_row(f"{T}\nGiven an image, find a similar everyday image with the described changes: Many hamster "
                      "together playing in a different background.\n", img("CIRR", 0),
                      f"{T}\nRepresent the given image.\n", img("CIRR", 1)),
                 _row(f"{T}\nGiven an image, find a similar everyday image with the described changes: Show two "
                      "dogs instead of one.\n", img("CIRR", 2), f"{T}\nRepresent the given image.\n", img("CIRR", 3))],
        "VisualNews_t2i": [_row("Retrieve an image of this news caption. Turkish President Tayyip Erdogan looks on "
                                "after arriving at Esenboga Airport in Ankara Turkey June 8 2015.\n", "",
                                f"{T}\nRepresent the given image.\n", img("VisualNews_t2i", 0)),
                           _row("Retrieve an image of this news caption. Firefighters work at the scene.\n", "",
                                f"{T}\nRepresent the given image.\n", img("VisualNews_t2i", 1))],
        "VisualNews_i2t": [_text(f"{T}\nFind a caption for the news in the given photo.\n", img("VisualNews_i2t", 0),
                                "Turkish President Tayyip Erdogan looks on after arriving at Esenboga Airport.",
                                "Firefighters work at the scene."),
                           _text(f"{T}\nFind a caption for the news in the given photo.\n", img("VisualNews_i2t", 1),
                                "A crowd gathers outside the court.")],
        "MSCOCO_t2i": [_row(MSCOCO_T2I_QUERY, "", f"{T}\nRepresent the given image.\n", img("MSCOCO_t2i", 0)),
                       _row("Find me an everyday image that matches the given caption: Two zebras grazing.\n", "",
                            f"{T}\nRepresent the given image.\n", img("MSCOCO_t2i", 1))],
        "MSCOCO_i2t": [_text(f"{T}\nFind an image caption describing the given everyday image.\n", img("MSCOCO_i2t", 0),
                            "A skateboarder in mid air following a jump form cincrete.", "Two zebras grazing."),
                       _text(f"{T}\nFind an image caption describing the given everyday image.\n", img("MSCOCO_i2t", 1),
                            "A plate of food on a table.")],
        "NIGHTS": [_row(f"{T}\nFind a day-to-day image that looks similar to the provided image.\n", img("NIGHTS", 0),
                        f"{T}\nRepresent the given image.\n", img("NIGHTS", 1)),
                   _row(f"{T}\nFind a day-to-day image that looks similar to the provided image.\n", img("NIGHTS", 2),
                        f"{T}\nRepresent the given image.\n", img("NIGHTS", 3))],
        "WebQA": [_row(WEBQA_QUERY, "", f"{T}\n{WEBQA_POSITIVE_BODY}\n", "images/WebQA/Train/30272327.jpg"),
                  _row(f"{T}\nFind a Wikipedia image that answers this question: What color is the dome?\n", "",
                       f"{T}\nRepresent the given Wikipedia image with related text information: The dome.\n",
                       "images/WebQA/Train/30272328.jpg")],
        "MSCOCO": [_row(MSCOCO_QUERY, "images/MSCOCO/Train/000000558840.jpg", MSCOCO_POSITIVE, MSCOCO_CROP),
                   _row(f'{T}\nSelect the portion of the image that isolates the object labeled as "cup"\n',
                        "images/MSCOCO/Train/000000000139.jpg", MSCOCO_POSITIVE,
                        "images/MSCOCO/Train/139_object_cup.jpg")],
    }
    return rows


def _diverse(row: dict) -> dict:
    """The `diverse_instruction` split: the same rows with reworded instructions."""
    reword = (("Represent the given image", "Encode this picture"), ("Find me an everyday image", "Retrieve a photo"),
              ("Identify the", "Name the"), ("Find a", "Look for a"))
    out = dict(row)
    for field in ("qry", "pos_text"):
        for old, new in reword:
            out[field] = out[field].replace(old, new)
    return out


def _write_mmeb_train(root: Path) -> dict[str, int]:
    repo = root / "TIGER-Lab" / "MMEB-train"
    schema = pa.schema([(c, pa.string()) for c in MMEB_COLUMNS])
    counts = {}
    for subset, rows in mmeb_train_rows().items():
        rng = random.Random(_seed(subset))
        for row in rows:
            for field in ("qry_image_path", "pos_image_path", "neg_image_path"):
                if row[field] and not (repo / row[field]).exists():
                    (repo / row[field]).parent.mkdir(parents=True, exist_ok=True)
                    (repo / row[field]).write_bytes(_image(rng))
        folder = repo / subset
        folder.mkdir(parents=True, exist_ok=True)
        for split, split_rows in (("original", rows), ("train", rows), ("diverse_instruction", map(_diverse, rows))):
            table = pa.Table.from_pylist(list(split_rows), schema=schema)
            pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
        counts[subset] = sum(1 for r in rows if (r["qry"] or r["qry_image_path"]) and (r["pos_text"]
                                                                                     or r["pos_image_path"]))
    return counts


def _hf_image_metadata(features: dict) -> dict:
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


COLPALI_SCHEMA = pa.schema(
    [("image", IMAGE_TYPE), ("image_filename", pa.string()), ("query", pa.string()), ("answer", pa.string()),
     ("source", pa.string()), ("options", pa.string()), ("page", pa.string()), ("model", pa.string()),
     ("prompt", pa.string()), ("answer_type", pa.string())],
    metadata=_hf_image_metadata({"image": {"_type": "Image"}, **{c: {"dtype": "string", "_type": "Value"} for c in (
        "image_filename", "query", "answer", "source", "options", "page", "model", "prompt", "answer_type")}}))


def colpali_rows() -> tuple[list[list[dict]], list[dict]]:
    """(train shards, test rows)."""
    rng = random.Random(_seed("colpali_train_set"))
    page = _image(rng, "PNG")

    def row(image, filename, query, answer, source, options=None, page_no=None, model=None, prompt=None):
        return dict(image=image, image_filename=filename, query=query, answer=answer, source=source,
                    options=options, page=page_no, model=model, prompt=prompt, answer_type=None)

    shards = [
        [row({"bytes": _image(rng), "path": "1810.07757_2.jpg"}, "images/1810.07757_2.jpg",
             "Comparing panels a, b, c, and d, which statement best describes the data variance?", "D", "arxiv_qa",
             options=COLPALI_OPTIONS, page_no="", model="gpt4V", prompt=""),
         row({"bytes": _image(rng), "path": "page_9.jpg"},
             "data/scrapped_pdfs_split/pages_extracted/energy_train/1d09a977.pdf/page_9.jpg",
             "What is the duration of the course mentioned in the image?",
             "['five to ten hours, not including field trips']", "pdf", page_no="9", model="sonnet",
             prompt=COLPALI_PROMPT)],
        [row({"bytes": page, "path": None}, "0fd47b51ae9248ef36669b8619b1223f268edae3e7a44ac1e6cebbbfaaf69f96",
             "What is the date?\nYour answer should be very brief.", "OCTOBER 17, 1995.", "docvqa")],
        [row({"bytes": page, "path": None}, "0fd47b51ae9248ef36669b8619b1223f268edae3e7a44ac1e6cebbbfaaf69f96",
             "Who signed the letter?\nYour answer should be very brief.", "J. SMITH", "docvqa")],
    ]
    test = [row({"bytes": _image(rng), "path": "page_1.jpg"}, "images/page_1.jpg", "What is shown?", "A chart",
                "pdf")]
    return shards, test


def _write_colpali(root: Path) -> int:
    folder = root / "vidore" / "colpali_train_set" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    shards, test = colpali_rows()
    for i, rows in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(rows, schema=COLPALI_SCHEMA), folder / f"train-{i:05d}-of-00082.parquet")
    pq.write_table(pa.Table.from_pylist(test, schema=COLPALI_SCHEMA), folder / "test-00000-of-00001.parquet")
    return sum(map(len, shards))


VISRAG_SCHEMA = pa.schema(
    [("query", pa.string()), ("image", IMAGE_TYPE), ("source", pa.string())],
    metadata=_hf_image_metadata({"query": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"},
                                 "source": {"dtype": "string", "_type": "Value"}}))


def visrag_rows() -> list[list[dict]]:
    rng = random.Random(_seed("visrag-indomain"))
    shared = _image(rng, "PNG")
    return [
        [dict(query="which are the countries with Chinese speaking population other than China according to this "
                    "infographic?", image={"bytes": _image(rng, "PNG"), "path": "1.png"}, source="InfoVQA"),
         dict(query="What was the share of online sales in 2019?", image={"bytes": shared, "path": "2.png"},
              source="ChartQA"),
         dict(query="What trend does the chart show after 2019?", image={"bytes": shared, "path": "2.png"},
              source="ChartQA")],
        [dict(query="What does the loss curve show for the largest model?",
              image={"bytes": _image(rng), "path": "3.jpeg"}, source="ArxivQA"),
         dict(query="What are the three pillars of the strategy?", image={"bytes": _image(rng), "path": "4.jpeg"},
              source="SlideVQA")],
    ]


def _write_visrag(root: Path) -> int:
    folder = root / "openbmb" / "VisRAG-Ret-Train-In-domain-data" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    shards = visrag_rows()
    for i, rows in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(rows, schema=VISRAG_SCHEMA),
                       folder / f"train-{i:05d}-of-{len(shards):05d}.parquet")
    return sum(map(len, shards))


def caption_rows() -> list[dict]:
    captions = ("The video opens with a view of an indoor court marked with various lines. Players throw red balls.",
                "A man stands behind a counter and slices bread while talking to the camera.",
                "A dog runs along a beach at sunset, chasing a ball thrown by a child.",
                "A car drives through a snowy forest road.")
    return [{"id": f"{video}_caption", "video": video,
             "conversations": [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": caption}]}
            for video, caption in zip(VIDEOS, captions)]


def qa_rows() -> list[dict]:
    items = (("v_--0edUL8zmA-Scene-001", "What is the setting of the video?",
              "The setting appears to be an indoor sports court."),
             ("v_1qs3ieXHJ5s-Scene-002", "What is the dog chasing?", "The dog is chasing a ball."),
             ("v_2Fn9Uq8DvTE-Scene-010", "What season is it?", "It is winter."))
    return [{"id": f"{video}_{i}", "video": video,
             "conversations": [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]}
            for i, (video, question, answer) in enumerate(items)]


def _write_llavahound(root: Path) -> dict[str, int]:
    repo = root / "ShareGPTVideo" / "train_video_and_instruction"
    sft = repo / "video_instruction" / "train" / "sft"
    sft.mkdir(parents=True, exist_ok=True)
    for name, rows in (("video_caption_300k", caption_rows()), ("video_240k_caption_15k", qa_rows())):
        with open(sft / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    for video in VIDEOS:
        folder = repo / "train_300k" / video
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(_seed(video))
        size = (rng.randint(28, 56), rng.randint(28, 56))  # the frames of one video share a size, as decoded ones do
        for name in frame_names(video):
            (folder / name).write_bytes(_image(rng, size=size))
    with_frames = {video for video, n in VIDEOS.items() if n}
    caption = sum(1 for row in caption_rows() if row["video"] in with_frames)
    return {"video_caption_300k": caption, "video_caption_300k-video": caption,
            "video_qa_240k": sum(1 for row in qa_rows() if row["video"] in with_frames)}


def frame_names(video: str) -> list[str]:
    """The frame file names `write` gives a video, in order: numbers with gaps (c01_0001, c01_0022, ...)."""
    rng = random.Random(_seed(video) + 1)
    names, number = [], 1
    for _ in range(VIDEOS[video]):
        names.append(f"c01_{number:04d}.jpeg")
        number += rng.randint(1, 21)
    return names


def write(root: str | Path) -> dict[str, int]:
    """Writes the training download under `root`; returns {prepared data set name: expected rows}."""
    root = Path(root)
    counts = _write_mmeb_train(root)
    counts["colpali_train_set"] = _write_colpali(root)
    counts["visrag-indomain"] = _write_visrag(root)
    counts.update(_write_llavahound(root))
    return counts
