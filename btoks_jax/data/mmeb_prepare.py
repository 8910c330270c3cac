"""`btoks data prepare`: the published training downloads -> the trainer's MMEB-train rows, one file a data set.

The 25 data sets of the headline mixture (configs/qwen2vl_2b.py: 20 MMEB-train subsets, ViDoRe's
colpali_train_set, VisRAG in-domain, three LLaVA-Hound sets) are read from a download root laid out as the
Hugging Face hub repositories are, `ROOT/<owner>/<name>/`, and written as `OUT/<name>.jsonl` (OUT defaults to
ROOT) in the row format of `btoks_jax.data.mmeb_train.read_mmeb_train`, texts already in the surface form of the
chosen prompt style.

Downloads (what each data set reads; archives extracted in place):

    hf download TIGER-Lab/MMEB-train --repo-type dataset --local-dir ROOT/TIGER-Lab/MMEB-train
    (cd ROOT/TIGER-Lab/MMEB-train && python unzip_file.py)   # images_zip/<Subset>.zip -> images/
    hf download vidore/colpali_train_set --repo-type dataset --local-dir ROOT/vidore/colpali_train_set \\
        --include "data/train-*"
    hf download openbmb/VisRAG-Ret-Train-In-domain-data --repo-type dataset \\
        --local-dir ROOT/openbmb/VisRAG-Ret-Train-In-domain-data
    hf download ShareGPTVideo/train_video_and_instruction --repo-type dataset \\
        --local-dir ROOT/ShareGPTVideo/train_video_and_instruction \\
        --include "video_instruction/train/sft/video_caption_300k.jsonl" \\
                  "video_instruction/train/sft/video_240k_caption_15k.jsonl" "train_300k/*"
    (cd ROOT/ShareGPTVideo/train_video_and_instruction/train_300k && for f in *.tar.gz; do tar -xzf "$f"; done)

- MMEB-train: `<Subset>/{train,original,diverse_instruction}-00000-of-00001.parquet`, images under `images/`
  (row paths start `images/`); the 20 subsets.
- colpali_train_set: `data/train-000NN-of-00082.parquet`, pages inline (written once, by content, to
  `OUT/media/colpali_train_set/`); VisRAG: `data/train-*.parquet`, pages inline (`OUT/media/visrag-indomain/`).
- LLaVA-Hound: the two JSONL files and the frame folders `train_300k/<video>/` (or `train_300k/train_300k/
  <video>/`); `video_caption_300k` and its text-to-video twin `video_caption_300k-video` read the first file,
  `video_qa_240k` all rows of the second. Rows list the paths of their picked frames.

Then:

    btoks data prepare --root ROOT [--out OUT] [--prompt-style btoks|vlm2vec] [--only NAME,...]
        [--caps none|vlm2vec|NAME=N,...] [--mmeb-split auto|train|original|diverse_instruction]
        [--negatives authors|all|none] [--tfds] [--overwrite]
    btoks train --config configs/qwen2vl_2b.py:data_root=OUT ...   # data.prompt_style must match

Media paths in the rows are relative to OUT (MMEB-train images and video frames point into ROOT). Each data set
is written to `OUT/<name>.jsonl.partial` and renamed when complete; `OUT/manifest.json` then records it: rows
written, read and skipped (with the reasons), the source files, prompt style, split, cap and negatives, the
published row count where the hub gives one (a mismatch is a warning there and on stderr, not an error) and
any other warning; `missing` lists the data sets whose source was not found, `prompt_style` the style they
all share ("mixed" if they do not). A rerun skips the data sets the
manifest records complete with the same settings (`--overwrite` redoes them); the command fails when nothing
could be prepared or when `--only` names a data set whose source is absent. A bad source row stops it with the
file, the row and the field. `--tfds` also writes the ArrayRecord copy of each set to `OUT/tfds`
(`DatasetSpec(name, OUT/tfds, format="tfds")`). The trainer's reader refuses a prepared file whose manifest
records another prompt style than the training config's (`mmeb_train.check_prepared_style`).

Where each default comes from (the authors' code unless said otherwise):
- MMEB-train parquet: split `train` when the subset has it, `original` otherwise (the authors' reader defaults
  to `train`: `MmebTrainDataset(split="train")` in src/vlm2emb/data/datasets/mmeb_train.py, no split set in
  configs/datasets/mmeb_train.yaml; VLM2Vec reads `original`, experiments/public/train/train_alltasks.yaml).
- Caps: none (configs/datasets/mmeb_train.yaml limits no data set); `--caps vlm2vec` takes VLM2Vec's first-N
  rows (`num_sample_per_subset` in train_alltasks.yaml).
- Negatives: kept where the authors keep them, dropped for the 11 subsets whose negative side they empty
  (`empty: empty_multimodal_input` in configs/datasets/mmeb_train.yaml, the same defaults in
  src/vlm2emb/data/datasets/mmeb_train.py); colpali, VisRAG and LLaVA-Hound have none. Neither trainer feeds
  negatives to the loss.
- Empty rows (a query or positive with neither text nor image): dropped for A-OKVQA and OK-VQA and an error
  elsewhere (`MMEB_TRAIN_EMPTY_SIDE_CLEANUP_SUBSETS`, src/vlm2emb/data/conversion/mmeb_train.py); VLM2Vec drops
  them everywhere (`data_prepare_v4`), and so does style "vlm2vec".
- Texts, style "btoks": the per-subset rules of src/vlm2emb/data/datasets/mmeb_train.py (WebQA's placeholder
  dropped from queries without image, `retrieval:\\n` in VisDial queries, ChartQA answers without trailing
  spaces, `<|image_1|>\\n` for the image-only VisDial negative), colpali as src/vlm2emb/data/datasets/vidore.py
  (`T\\n{query}\\n` / `{answer}\\n`; a multiple-choice row gets ` Options: [...]` after its query and the
  chosen option's text as its answer), VisRAG as src/vlm2emb/data/datasets/visrag.py (`{Q}{query}\\n` /
  `T\\n{P}\\n`), LLaVA-Hound as src/vlm2emb/data/datasets/llavahound.py with the prompts of
  configs/datasets/mmeb_train.yaml; every side then in the form `mmeb_train.btoks_canonical_text` gives: one
  final newline, as that yaml documents each data set's final strings (their code leaves text-only MMEB-train
  sides and the `trailing_newline: preserve` sides without it). Style "vlm2vec": VLM2Vec's strings as its
  src/data/dataset/{mmeb,vidore,visrag,llavahound_dataset_caption,llavahound_dataset_qa}.py build them.
- Video frames: the frame files of the row's folder with a .jpg/.jpeg/.png suffix, naturally sorted (digit
  runs as numbers, case ignored), `linspace(0, n - 1, 8).astype(int)` of them when there are at least 8, all
  of them when fewer, the row skipped when none (VLM2Vec src/utils/vision_utils/vision_utils.py; the authors'
  runtime, over its own frame table, takes frames int(i * n / 8) and fails on a video without frames).

Rows keep the MMEB placeholders `<|image_1|>` / `<|video_1|>`; the reader turns them into the style's pads.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from btoks_jax.data.media import RowError
from btoks_jax.data.mmeb_train import PREPARED_MANIFEST, Side, btoks_canonical_text, parse_record

PROMPT_STYLES = ("btoks", "vlm2vec")
MMEB_SPLITS = ("auto", "train", "original", "diverse_instruction")
NEGATIVES = ("authors", "all", "none")
MANIFEST_FORMAT = 1
IMAGE = "<|image_1|>"
VIDEO = "<|video_1|>"
NUM_FRAMES = 8
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")  # VLM2Vec's IMAGE_EXTENSIONS

MMEB_TRAIN_REPO = "TIGER-Lab/MMEB-train"
COLPALI_REPO = "vidore/colpali_train_set"
VISRAG_REPO = "openbmb/VisRAG-Ret-Train-In-domain-data"
LLAVAHOUND_REPO = "ShareGPTVideo/train_video_and_instruction"
LLAVAHOUND_SFT = "video_instruction/train/sft"
LLAVAHOUND_FRAMES = "train_300k"

# In the order of configs/qwen2vl_2b.py (MMEB_TRAIN + EXTRA).
MMEB_TRAIN_SUBSETS = (
    "ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA",
    "ChartQA", "Visual7W", "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
    "NIGHTS", "WebQA", "MSCOCO",
)
# name -> (family, LLaVA-Hound mode)
EXTRA_SETS = {
    "colpali_train_set": ("colpali", None),
    "visrag-indomain": ("visrag", None),
    "video_caption_300k": ("llavahound", "caption"),
    "video_caption_300k-video": ("llavahound", "video"),
    "video_qa_240k": ("llavahound", "qa"),
}
DATASETS = MMEB_TRAIN_SUBSETS + tuple(EXTRA_SETS)
LLAVAHOUND_FILES = {"caption": "video_caption_300k.jsonl", "video": "video_caption_300k.jsonl",
                    "qa": "video_240k_caption_15k.jsonl"}

# VLM2Vec's first-N rows (`num_sample_per_subset`, experiments/public/train/train_alltasks.yaml); the visual
# document and video sets are not capped there (the video sets' `num_rows` is not read by its loaders).
VLM2VEC_CAPS = {
    "ImageNet_1K": 100_000, "N24News": 50_000, "HatefulMemes": 10_000, "VOC2007": 10_000, "SUN397": 20_000,
    "OK-VQA": 10_000, "A-OKVQA": 20_000, "DocVQA": 40_000, "InfographicsVQA": 25_000, "ChartQA": 28_000,
    "Visual7W": 70_000, "VisDial": 130_000, "CIRR": 30_000, "VisualNews_t2i": 100_000, "VisualNews_i2t": 100_000,
    "MSCOCO_t2i": 100_000, "MSCOCO_i2t": 120_000, "NIGHTS": 20_000, "WebQA": 20_000, "MSCOCO": 100_000,
}
# Rows of one published split as the hub pages give them (rounded; MMEB-train pages count both splits).
PUBLISHED_ROWS = {"ImageNet_1K": 100_000, "A-OKVQA": 17_050, "VisDial": 123_500, "colpali_train_set": 118_000}
PUBLISHED_TOLERANCE = 0.01

# ---- the authors' MMEB-train surface rules (src/vlm2emb/data/datasets/mmeb_train.py, DEFAULT_TRANSFORM_BY_SUBSET)
_IMAGE_FIRST_QUERY = {"A-OKVQA", "ChartQA", "CIRR", "DocVQA", "HatefulMemes", "ImageNet_1K", "InfographicsVQA",
                      "MSCOCO", "MSCOCO_i2t", "N24News", "NIGHTS", "OK-VQA", "SUN397", "VOC2007", "Visual7W",
                      "VisualNews_i2t"}
_IMAGE_FIRST_POSITIVE = {"CIRR", "MSCOCO", "MSCOCO_t2i", "NIGHTS", "VisualNews_t2i", "WebQA", "VisDial"}
AUTHORS_NO_NEGATIVE = frozenset({"CIRR", "ImageNet_1K", "MSCOCO", "MSCOCO_i2t", "MSCOCO_t2i", "NIGHTS", "SUN397",
                                 "VOC2007", "VisualNews_i2t", "VisualNews_t2i", "WebQA"})
AUTHORS_EMPTY_ROWS_DROPPED = frozenset({"A-OKVQA", "OK-VQA"})

# ---- VisRAG's per-source prompts (identical in VLM2Vec src/data/dataset/visrag_dataset.py and the authors'
# src/vlm2emb/data/datasets/visrag.py / configs/datasets/mmeb_train.yaml)
VISRAG_QUERY_PROMPTS = {
    "NeurIPS Papers": "This query is about a research paper from NeurIPS, a leading AI/ML conference. The document "
                      "contains technical discussions, methodologies, and findings. Identify relevant papers and "
                      "sections that address the query: ",
    "Textbooks": "This query is related to a college-level textbook, which provides structured explanations, "
                 "definitions, and examples. Find the most relevant concepts or explanations that address the "
                 "query: ",
    "ICML Papers": "This query is about a research paper from ICML, a leading AI/ML conference. The document "
                   "contains theoretical insights, experiments, and applications. Identify relevant papers and "
                   "sections that best answer the query: ",
    "Manuallib": "This query pertains to a product manual, which contains detailed technical specifications, usage "
                 "instructions, and troubleshooting steps. Find the most relevant section that answers the query: ",
    "ArxivQA": "This query is related to retrieving a relevant figure from an ArXiv research paper. The retrieved "
               "figure should contain scientific plots, mathematical visualizations, or experimental results that "
               "best address the query: ",
    "ChartQA": "This query is related to retrieving a relevant chart that visually represents numerical or "
               "categorical data. The retrieved chart should contain bar graphs, line charts, or other visual "
               "elements necessary to analyze trends, compare values, or extract insights related to the query: ",
    "MP-DocVQA": "This query is related to retrieving a relevant page from a multi-page document, such as reports, "
                 "invoices, or research papers. The retrieved document should contain text, tables, or structured "
                 "information necessary to answer the query: ",
    "InfoVQA": "This query is related to retrieving an infographic that visually presents statistical or factual "
               "information using charts, icons, and structured layouts. The retrieved image should contain the "
               "necessary visual elements to provide the best context for answering the query: ",
    "PlotQA": "This query relates to retrieving a relevant plot or chart that visually represents numerical data. "
              "The retrieved figure should contain the necessary information to analyze trends, compare values, "
              "or extract key insights related to the query: ",
    "SlideVQA": "This query is related to retrieving a relevant presentation slide that visually presents "
                "structured information. The retrieved slide should contain the necessary text, charts, or "
                "graphics to provide the best answer to the query: ",
}
VISRAG_TARGET_PROMPTS = {
    "Textbooks": "A textbook page with structured educational content and explanations.",
    "ICML Papers": "A research paper from ICML, covering machine learning topics.",
    "NeurIPS Papers": "A research paper from NeurIPS on AI and ML topics.",
    "Manuallib": "A product manual page with technical specifications and instructions.",
    "InfoVQA": "An infographic with structured data, charts, and annotations.",
    "PlotQA": "A numerical data visualization, such as bar charts or line graphs.",
    "SlideVQA": "A presentation slide with text, bullet points, and diagrams.",
    "ArxivQA": "A figure from a research paper, including plots or experimental results.",
    "MP-DocVQA": "A page from a multi-page document with text or tables.",
    "ChartQA": "A statistical chart comparing values or analyzing trends.",
}
# LLaVA-Hound prompts (VLM2Vec VRET_QRY_PROMPT / VRET_TGT_PROMPT / QA_QUERY_PROMPT; the authors' yaml drops the
# final space and joins with a space, a space and a newline).
VRET_QUERY_PROMPT = "Find a video that contains the following visual content: "
VRET_TARGET_PROMPT = "Understand the content of the provided video: "
QA_QUERY_PROMPT = "Answer a question based on the content of a video. "

_PLACEHOLDERS = re.compile(r"<\|(?:image|video)_\d+\|>")


class Skip(Exception):
    """A source row that is left out, with the reason counted in the manifest."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ===================================== text rules =====================================


def tidy(text: str) -> str:
    """The authors' whitespace normalisation: LF line ends, no trailing blanks on any line, no leading or
    trailing blanks overall (newlines at the ends kept), "" for blank text."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n")).strip(" \t")
    return text if text.strip() else ""


def _one_newline(text: str) -> str:
    return text.rstrip("\n") + "\n" if text else ""


def token_first(text: str, token: str) -> str:
    """The authors' placement of a text's single vision token (their `canonicalize_multimodal_text`): a token on
    its own line, at the start of the first line or at the end of it moves to a line of its own before the rest;
    anything else is only tidied."""
    text = tidy(text)
    core = text.rstrip("\n")
    tail = text[len(core):]
    if not core or core.count(token) != 1:
        return text
    lines = core.split("\n")
    if any(line.strip(" \t") == token for line in lines):
        body = "\n".join(line.strip(" \t") for line in lines if line.strip(" \t") != token).strip()
    else:
        first, rest = lines[0], "\n".join(lines[1:])
        lead = first.lstrip(" \t")
        if lead.startswith(token) and lead[len(token):][:1] in (" ", "\t"):
            body = core.lstrip(" \t")[len(token):].strip()
        elif first.rstrip(" \t").endswith(token) and first.rstrip(" \t")[:-len(token)][-1:] in (" ", "\t"):
            body = "\n".join(part for part in (first.rstrip(" \t")[:-len(token)].strip(), rest.strip()) if part)
        else:
            return text
    return (f"{token}\n{body}" if body else token) + tail


def btoks_text(text: str, media: str | None) -> str:
    """A side's final text in style "btoks": `btoks_canonical_text` of it (media: "image", "video" or None)."""
    side = Side(text, image="x" if media == "image" else None, video=("x",) if media == "video" else None)
    return btoks_canonical_text(side)


def mmeb_side_btoks(subset: str, side: str, text: str, has_image: bool) -> str:
    """One MMEB-train side after the authors' rules for `subset` (text with `<|image_1|>`; "" = no content)."""
    text = text.replace("<image>", IMAGE)  # their legacy image token, read as the placeholder
    if subset == "WebQA" and side == "query" and not has_image:
        text = _one_newline(tidy(_PLACEHOLDERS.sub("", text).strip("\n")))
    elif subset == "VisDial" and side == "negative" and has_image and not text.strip():
        text = IMAGE
    image_first = ((side == "query" and subset in _IMAGE_FIRST_QUERY)
                   or (side == "positive" and subset in _IMAGE_FIRST_POSITIVE)
                   or (side == "negative" and subset == "VisDial"))
    if image_first and has_image and text.startswith(IMAGE):
        body = text[len(IMAGE):].lstrip(" \t\n")
        text = _one_newline(tidy(f"{IMAGE}\n{body}" if body else IMAGE))
    if subset == "VisDial" and side == "query":
        text = _one_newline(tidy(text.replace("image retrieval: Q:", "image retrieval:\nQ:", 1)))
    if subset == "ChartQA" and side != "query":
        text = text.rstrip(" \t")
    if not text.strip() and not has_image:
        return ""
    return btoks_text(text, "image" if has_image else None)


def colpali_texts(query: str, answer: str, options: Any, style: str) -> tuple[str, str]:
    """(query text, positive text) of a colpali_train_set row; the page image is on the query side."""
    if style == "vlm2vec":
        return f"{IMAGE} {query}", answer  # vidore_dataset.py: the `prompt` column is ignored
    parsed = _parse_options(options)
    text = query
    if parsed:
        text = f"{text} Options: {options if isinstance(options, str) else parsed}"
        letters = ("A", "B", "C", "D", "E")
        chosen = parsed[letters.index(answer)] if answer in letters[:len(parsed)] else answer
        answer = chosen.replace(f"{answer}. ", "").replace(f"{answer}) ", "")
    tidied = tidy(text)
    query_text = token_first(f"{IMAGE} {tidied}" if tidied else IMAGE, IMAGE)
    answer = tidy(answer)
    return btoks_text(query_text, "image"), (btoks_text(answer, None) if answer else "")


def _parse_options(options: Any) -> list[str] | None:
    if options is None or options == "":
        return None
    if isinstance(options, (list, tuple)):
        return [str(o) for o in options]
    if isinstance(options, str):
        try:
            value = ast.literal_eval(options)
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            return None
        if isinstance(value, list):
            return [str(o) for o in value]
    return None


def visrag_texts(query: str, source: str, style: str) -> tuple[str, str]:
    """(query text, positive text) of a VisRAG row; the page image is on the positive side."""
    q, p = VISRAG_QUERY_PROMPTS.get(source, ""), VISRAG_TARGET_PROMPTS.get(source, "")
    if style == "vlm2vec":
        return (f"{q} {query} " if q else f"{query} "), (f"{p}  {IMAGE}" if p else f" {IMAGE}")
    joined = tidy(q + query if q and query else q or query)
    positive = token_first(f"{IMAGE} {p}" if p else IMAGE, IMAGE)
    return (btoks_text(joined, None) if joined else ""), btoks_text(positive, "image")


def llavahound_texts(first: str, second: str, mode: str, style: str) -> tuple[str, str]:
    """(query text, positive text) of a LLaVA-Hound row from its human and gpt turns; the video is on the query
    side in modes "caption" and "qa", on the positive side in mode "video"."""
    if mode == "video":
        if style == "vlm2vec":
            return VRET_QUERY_PROMPT + second, VRET_TARGET_PROMPT + VIDEO
        query = tidy(f"{VRET_QUERY_PROMPT.rstrip()} {second}" if second else VRET_QUERY_PROMPT.rstrip())
        positive = tidy(f"{VRET_TARGET_PROMPT.rstrip()} {VIDEO}")
        return btoks_text(query, None), btoks_text(positive, "video")
    turn = first.replace("<video>", VIDEO)
    if style == "vlm2vec":
        return (QA_QUERY_PROMPT + turn if mode == "qa" else turn), second
    if mode == "qa":
        turn = f"{QA_QUERY_PROMPT.rstrip()}\n{turn}" if turn else QA_QUERY_PROMPT.rstrip()
    answer = tidy(second)
    return (btoks_text(token_first(turn or VIDEO, VIDEO), "video"),
            btoks_text(answer, None) if answer else "")


# ===================================== frames and media =====================================


def _frame_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def pick_frames(folder: Path, num_frames: int = NUM_FRAMES) -> list[Path]:
    """The frames a video row uses: natural order, `linspace(0, n - 1, num_frames).astype(int)` of n >= num_frames
    frames, all of fewer; [] when the folder is absent or holds no frame."""
    if not folder.is_dir():
        return []
    names = sorted((p.name for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_frame_key)
    if len(names) >= num_frames:
        names = [names[i] for i in np.linspace(0, len(names) - 1, num_frames).astype(int)]
    return [folder / name for name in names]


_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def _image_suffix(data: bytes, path: str | None) -> str:
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    suffix = Path(path or "").suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ".img"


class MediaWriter:
    """Writes inline images once under `out/media/<name>/`, named by their content (sha1), so a page shared by
    several rows, or written by an interrupted run, is stored once; each file appears complete or not at all."""

    def __init__(self, out: Path, name: str):
        self.out, self.folder = out, Path("media") / name
        self.written = self.reused = 0

    def put(self, data: bytes, path: str | None) -> str:
        digest = hashlib.sha1(data).hexdigest()
        relative = self.folder / digest[:2] / f"{digest}{_image_suffix(data, path)}"
        target = self.out / relative
        if target.is_file():
            self.reused += 1
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            partial.write_bytes(data)
            os.replace(partial, target)
            self.written += 1
        return relative.as_posix()


# ===================================== sources =====================================


@dataclasses.dataclass
class Job:
    """One data set to prepare: where its source is and what was found there."""

    name: str
    family: str
    mode: str | None
    repo_dir: Path
    files: list[Path] = dataclasses.field(default_factory=list)
    split: str | None = None
    missing: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    source_rows: int | None = None


def _hf_download(repo: str) -> str:
    return f"hf download {repo} --repo-type dataset --local-dir ROOT/{repo}"


def _split_shards(folder: Path, split: str) -> list[Path]:
    """A split's parquet shards as the hub lays them out (`data/<split>-*.parquet`, `<split>-*.parquet` or
    `<split>.parquet`), the way the authors' conversions find them."""
    for pattern in (f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}.parquet"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    return []


def _shard_warning(files: list[Path]) -> str | None:
    match = re.search(r"-of-(\d+)\.parquet$", files[0].name) if files else None
    if match and len(files) != int(match.group(1)):
        return (f"{len(files)} of the {int(match.group(1))} shards are present (an incomplete download?): "
                f"{files[0].parent}")
    return None


def plan(root: Path, name: str, mmeb_split: str = "auto") -> Job:
    """Finds the source files of data set `name` under the download root (`job.missing` says what is absent)."""
    if name in MMEB_TRAIN_SUBSETS:
        job = Job(name, "mmeb_train", None, root / MMEB_TRAIN_REPO)
        folder = job.repo_dir / name
        splits = ("train", "original") if mmeb_split == "auto" else (mmeb_split,)
        for split in splits:
            if (folder / f"{split}-00000-of-00001.parquet").is_file():
                job.split, job.files = split, [folder / f"{split}-00000-of-00001.parquet"]
                break
        if not job.files:
            job.missing = (f"no {' or '.join(s + '-00000-of-00001.parquet' for s in splits)} in {folder} "
                           f"({_hf_download(MMEB_TRAIN_REPO)}; then `python unzip_file.py` there)")
        elif mmeb_split == "auto" and job.split != "train":
            job.warnings.append(f"{folder} has no train-00000-of-00001.parquet (the authors' default split); "
                                f"read split {job.split!r} instead")
        return job
    family, mode = EXTRA_SETS[name]
    if family in ("colpali", "visrag"):
        repo = COLPALI_REPO if family == "colpali" else VISRAG_REPO
        job = Job(name, family, None, root / repo, split="train")
        job.files = _split_shards(job.repo_dir, "train")
        if not job.files:
            job.missing = f"no train parquet shards under {job.repo_dir} ({_hf_download(repo)})"
        elif (warning := _shard_warning(job.files)) is not None:
            job.warnings.append(warning)
        return job
    job = Job(name, family, mode, root / LLAVAHOUND_REPO)
    jsonl = job.repo_dir / LLAVAHOUND_SFT / LLAVAHOUND_FILES[mode]
    frames = job.repo_dir / LLAVAHOUND_FRAMES
    if not jsonl.is_file():
        job.missing = f"{jsonl} not found ({_hf_download(LLAVAHOUND_REPO)} --include '{LLAVAHOUND_SFT}/*.jsonl')"
    elif not frames.is_dir():
        job.missing = (f"no frame folder {frames} (download {LLAVAHOUND_FRAMES}/chunk_*.tar.gz and extract them "
                       f"there)")
    else:
        job.files = [jsonl]
    return job


def _parquet_rows(files: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _iter_parquet(file: Path, columns: list[str], batch_size: int) -> Iterator[tuple[int, dict]]:
    """(1-based row number, record) of a parquet file, one record batch in memory at a time."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file)
    present = [c for c in columns if c in parquet.schema_arrow.names]
    number = 0
    for batch in parquet.iter_batches(batch_size=batch_size, columns=present):
        for record in batch.to_pylist():
            number += 1
            yield number, record


def _iter_jsonl(file: Path) -> Iterator[tuple[int, Any]]:
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}: row {number}: not valid JSON ({err.msg})") from None


def _string(record: dict, field: str, required: bool = False) -> str:
    if field not in record:
        if required:
            raise RowError(field, "missing")
        return ""
    value = record[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type(value).__name__}")
    return value


def _inline_image(record: dict, field: str = "image") -> tuple[bytes, str | None]:
    value = record.get(field)
    if not isinstance(value, dict):
        raise RowError(field, f"expected an image struct {{bytes, path}}, got {type(value).__name__}")
    data = value.get("bytes")
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise RowError(field, "the image struct holds no bytes")
    path = value.get("path")
    return bytes(data), path if isinstance(path, str) else None


# ===================================== rows =====================================


@dataclasses.dataclass
class Context:
    out: Path
    style: str
    negatives: str
    media: MediaWriter | None = None
    frame_root: Path | None = None
    stripped: int = 0  # placeholders removed from sides without media (VLM2Vec keeps them: its WebQA queries)
    unknown_sources: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def _relative(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def mmeb_train_row(record: dict, job: Job, ctx: Context) -> dict:
    """One MMEB-train record -> a trainer row (raises RowError, Skip)."""
    if not isinstance(record, dict):
        raise RowError("<row>", f"expected an object, got {type(record).__name__}")
    subset = job.name
    texts = {f: _string(record, f, required=f in ("qry", "pos_text")) for f in ("qry", "pos_text", "neg_text")}
    paths = {}
    for field in ("qry_image_path", "pos_image_path", "neg_image_path"):
        value = _string(record, field, required=field != "neg_image_path").strip()
        if value and not (job.repo_dir / value).is_file():
            raise RowError(field, f"image file not found: {job.repo_dir / value}")
        paths[field] = value
    empty_side = (not texts["qry"] and not paths["qry_image_path"]) or (not texts["pos_text"]
                                                                         and not paths["pos_image_path"])
    if empty_side:
        if ctx.style == "btoks" and subset not in AUTHORS_EMPTY_ROWS_DROPPED:
            field = "qry" if not texts["qry"] and not paths["qry_image_path"] else "pos_text"
            raise RowError(field, f"the side has no text and no image (the authors drop such rows only in "
                                  f"{', '.join(sorted(AUTHORS_EMPTY_ROWS_DROPPED))})")
        raise Skip("empty query or positive side")
    keep_negative = ctx.negatives == "all" or (ctx.negatives == "authors" and subset not in AUTHORS_NO_NEGATIVE)
    row = {}
    sides = (("query", "qry", "qry_image_path"), ("positive", "pos_text", "pos_image_path"),
             ("negative", "neg_text", "neg_image_path"))
    for side, text_field, image_field in sides:
        text, image = texts[text_field], paths[image_field]
        if side == "negative" and not keep_negative:
            text, image = "", ""
        if ctx.style == "btoks":
            text = mmeb_side_btoks(subset, side, text, bool(image))
        else:
            text = _vlm2vec_side(text, bool(image), ctx)
        row[text_field] = text
        row[image_field] = _relative(job.repo_dir / image, ctx.out) if image else ""
    return row


def _vlm2vec_side(text: str, has_media: bool, ctx: Context, kind: str = "image") -> str:
    """VLM2Vec's text as the reader takes it: a placeholder without media is dropped (the reader's repair,
    VLM2Vec would feed a lone pad), media without text becomes the bare placeholder."""
    if not has_media and _PLACEHOLDERS.search(text):
        ctx.stripped += 1
        return _PLACEHOLDERS.sub("", text).strip()
    if has_media and not text.strip():
        return VIDEO if kind == "video" else IMAGE
    return text


def colpali_row(record: dict, job: Job, ctx: Context) -> dict:
    query = _string(record, "query", required=True)
    answer = _string(record, "answer", required=True)
    options = record.get("options")
    data, path = _inline_image(record)
    query_text, positive = colpali_texts(query, answer, options, ctx.style)
    if not positive:
        raise Skip("empty answer")
    return {"qry": query_text, "qry_image_path": ctx.media.put(data, path or _string(record, "image_filename")),
            "pos_text": positive, "pos_image_path": "", "neg_text": "", "neg_image_path": ""}


def visrag_row(record: dict, job: Job, ctx: Context) -> dict:
    query = _string(record, "query", required=True)
    source = _string(record, "source")
    data, path = _inline_image(record)
    query_text, positive = visrag_texts(query, source, ctx.style)
    if not query_text.strip():
        raise Skip("empty query")
    if source not in VISRAG_QUERY_PROMPTS:
        ctx.unknown_sources[source] += 1
    return {"qry": query_text, "qry_image_path": "", "pos_text": positive,
            "pos_image_path": ctx.media.put(data, path), "neg_text": "", "neg_image_path": ""}


def llavahound_row(record: dict, job: Job, ctx: Context) -> dict:
    if not isinstance(record, dict):
        raise RowError("<row>", f"expected an object, got {type(record).__name__}")
    video = _string(record, "video", required=True).strip()
    if not video:
        raise RowError("video", "empty")
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise RowError("conversations", "expected a list of at least two turns {from, value}")
    values = []
    for i in (0, 1):
        if not isinstance(turns[i], dict) or not isinstance(turns[i].get("value"), str):
            raise RowError(f"conversations[{i}].value", "expected a string")
        values.append(turns[i]["value"])
    if job.mode != "video" and "<video>" not in values[0]:
        raise RowError("conversations[0].value", "the human turn has no <video> token")
    frames = pick_frames(ctx.frame_root / video)
    if not frames:
        raise Skip("no frame folder" if not (ctx.frame_root / video).is_dir() else "no frames in the folder")
    query, positive = llavahound_texts(values[0], values[1], job.mode, ctx.style)
    if not positive:
        raise Skip("empty answer")
    frame_list = [_relative(f, ctx.out) for f in frames]
    side = "pos" if job.mode == "video" else "qry"
    row = {"qry": query, "qry_image_path": "", "pos_text": positive, "pos_image_path": "", "neg_text": "",
           "neg_image_path": ""}
    row[f"{side}_video_path"] = frame_list
    return row


_ROW_BUILDERS = {"mmeb_train": mmeb_train_row, "colpali": colpali_row, "visrag": visrag_row,
                 "llavahound": llavahound_row}
_COLUMNS = {
    "mmeb_train": ["qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path"],
    "colpali": ["image", "image_filename", "query", "answer", "options"],
    "visrag": ["query", "image", "source"],
}
_BATCH_ROWS = {"mmeb_train": 4096, "colpali": 32, "visrag": 32}  # inline page images: small batches


def _records(job: Job) -> Iterator[tuple[Path, int, Any]]:
    for file in job.files:
        if file.suffix == ".jsonl":
            for number, record in _iter_jsonl(file):
                yield file, number, record
        else:
            for number, record in _iter_parquet(file, _COLUMNS[job.family], _BATCH_ROWS[job.family]):
                yield file, number, record


# ===================================== one data set =====================================


def _settings(job: Job, style: str, cap: int | None, negatives: str, mmeb_split: str) -> dict:
    settings = {"format": MANIFEST_FORMAT, "prompt_style": style, "cap": cap}
    if job.family == "mmeb_train":
        settings.update(mmeb_split=mmeb_split, negatives=negatives)
    if job.family == "llavahound":
        settings.update(num_frames=NUM_FRAMES)
    return settings


def prepare_dataset(job: Job, root: Path, out: Path, *, style: str, cap: int | None, negatives: str,
                    settings: dict, progress: bool | None = None) -> dict:
    """Writes `out/<name>.jsonl` (through a temp file renamed when complete) and returns its manifest entry."""
    from tqdm import tqdm

    ctx = Context(out=out, style=style, negatives=negatives)
    if job.family in ("colpali", "visrag"):
        ctx.media = MediaWriter(out, job.name)
    if job.family == "llavahound":
        ctx.frame_root = job.repo_dir / LLAVAHOUND_FRAMES
        nested = ctx.frame_root / LLAVAHOUND_FRAMES  # archives whose members start with train_300k/
        if nested.is_dir():
            ctx.frame_root = nested
    if job.family != "llavahound":
        job.source_rows = _parquet_rows(job.files)
    total = job.source_rows if cap is None or job.source_rows is None else min(cap, job.source_rows)
    build = _ROW_BUILDERS[job.family]
    target = out / f"{job.name}.jsonl"
    partial = out / f"{job.name}.jsonl.partial"
    skipped: collections.Counter = collections.Counter()
    written = read = 0
    bar = tqdm(total=total, desc=job.name, unit="row", disable=progress if progress is None else not progress,
               file=sys.stderr)
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for file, number, record in _records(job):
                if cap is not None and read >= cap:
                    break
                read += 1
                bar.update(1)
                source = f"{file}: row {number}"
                try:
                    row = build(record, job, ctx)
                    # What the trainer's reader accepts, given the download root as a media folder
                    # (DatasetSpec.media_roots) for rows written outside it.
                    parse_record(row, out, source, check_files=False, media_roots=(root,))
                except Skip as skip:
                    skipped[skip.reason] += 1
                    continue
                except RowError as err:
                    raise err.at(source) from None
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
    except Exception:
        partial.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    os.replace(partial, target)
    warnings = list(job.warnings)
    if ctx.stripped:
        warnings.append(f"{ctx.stripped} placeholder(s) removed from sides without media (VLM2Vec feeds a lone "
                        f"pad there, which the reader does not take)")
    if ctx.unknown_sources:
        warnings.append(f"rows of sources without a prompt (empty prompts, as both references): "
                        f"{dict(ctx.unknown_sources)}")
    published = PUBLISHED_ROWS.get(job.name)
    if published is not None and job.source_rows is not None and (
            abs(job.source_rows - published) > PUBLISHED_TOLERANCE * published):
        warnings.append(f"the source holds {job.source_rows} rows, the published split about {published}")
    entry = {
        "file": target.name,
        "complete": True,
        "prompt_style": style,
        "settings": settings,
        "rows_written": written,
        "rows_read": read,
        "rows_skipped": dict(skipped),
        "source_rows": job.source_rows if job.source_rows is not None else None if cap is not None else read,
        "source_files": [_relative(f, root) for f in job.files],
        "split": job.split,
        "cap": cap,
        "published_rows": published,
        "warnings": warnings,
    }
    if job.family == "mmeb_train":
        entry["negatives"] = negatives
    if ctx.media is not None:
        entry["media"] = {"folder": ctx.media.folder.as_posix(), "written": ctx.media.written,
                          "reused": ctx.media.reused}
    return entry


# ===================================== the whole mixture =====================================


def parse_caps(spec: str | dict | None) -> dict[str, int]:
    """`--caps`: "none" (default), "vlm2vec" (VLM2Vec's first-N rows) and/or `NAME=N` items, comma-separated."""
    if spec is None or isinstance(spec, dict):
        return dict(spec or {})
    caps: dict[str, int] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item or item == "none":
            continue
        if item == "vlm2vec":
            caps.update(VLM2VEC_CAPS)
            continue
        name, sep, value = item.partition("=")
        if not sep or name not in DATASETS or not value.isdigit():
            raise ValueError(f"--caps: expected none, vlm2vec or NAME=N with NAME one of the {len(DATASETS)} data "
                             f"sets, got {item!r}")
        caps[name] = int(value)
    return caps


def _load_manifest(out: Path) -> dict:
    path = out / PREPARED_MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "datasets": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); remove it or pass --overwrite") from None
    manifest.setdefault("datasets", {})
    return manifest


def _save_manifest(out: Path, manifest: dict) -> None:
    path = out / PREPARED_MANIFEST
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _warn(message: str) -> None:
    print(f"btoks data prepare: warning: {message}", file=sys.stderr)


def prepare(root: str | os.PathLike, out: str | os.PathLike | None = None, *, prompt_style: str = "btoks",
            only: str | list[str] | None = None, caps: str | dict | None = None, mmeb_split: str = "auto",
            negatives: str = "authors", tfds: bool = False, overwrite: bool = False,
            progress: bool | None = None) -> dict:
    """Prepares the mixture's data sets found under download root `root` into `out` (default: `root`).

    Each data set goes to `out/<name>.jsonl` through `out/<name>.jsonl.partial`, renamed when complete, and is
    then recorded in `out/manifest.json`; a data set the manifest records complete with the same settings is
    skipped unless `overwrite`. Data sets whose source is absent are reported missing.

    Args:
      prompt_style: "btoks" (the authors' texts) or "vlm2vec" (VLM2Vec's).
      only: names (a list or a comma-separated string) to prepare; default all 25.
      caps: `parse_caps` spec (first-N source rows); default none.
      mmeb_split: MMEB-train parquet: "auto" (train, else original), "train", "original", "diverse_instruction".
      negatives: MMEB-train negatives: "authors" (their choice per subset), "all" or "none".
      tfds: also build the ArrayRecord copy of each prepared set under `out/tfds` (`tfds_mmeb.build_tfds`).
      progress: a tqdm bar per data set (None: when stderr is a terminal).
    Returns:
      {"prepared": [names], "skipped": [names already complete], "missing": {name: what is absent},
       "manifest": the manifest written}.
    Raises:
      ValueError naming file, row and field of a bad source row; FileNotFoundError when nothing could be
      prepared or when `only` names a data set whose source is absent.
    """
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    if mmeb_split not in MMEB_SPLITS:
        raise ValueError(f"mmeb_split must be one of {MMEB_SPLITS}, got {mmeb_split!r}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    root = Path(root)
    out = Path(out) if out else root
    if not root.is_dir():
        raise FileNotFoundError(f"download root not found: {root}")
    names = [n.strip() for n in only.split(",")] if isinstance(only, str) else list(only or DATASETS)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"unknown data set(s) {unknown}; the mixture's are: {', '.join(DATASETS)}")
    cap_of = parse_caps(caps)
    jobs = [plan(root, name, mmeb_split) for name in names]
    missing = {job.name: job.missing for job in jobs if job.missing}
    if only and missing:
        raise FileNotFoundError("source not found for --only data set(s): "
                                + "; ".join(f"{n}: {why}" for n, why in missing.items()))
    if len(missing) == len(jobs):
        raise FileNotFoundError(f"nothing to prepare under {root}: "
                                + "; ".join(f"{n}: {why}" for n, why in missing.items()))
    out.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(out)
    prepared, skipped = [], []
    for job in jobs:
        if job.missing:
            continue
        cap = cap_of.get(job.name)
        settings = _settings(job, prompt_style, cap, negatives, mmeb_split)
        entry = manifest["datasets"].get(job.name)
        done = (not overwrite and isinstance(entry, dict) and entry.get("complete")
                and entry.get("settings") == settings and (out / f"{job.name}.jsonl").is_file())
        if done:
            skipped.append(job.name)
        else:
            manifest["datasets"].pop(job.name, None)
            _save_manifest(out, manifest)  # from here on the old file does not count as done
            _drop_tfds(out, job.name)  # an ArrayRecord copy of the old rows would be stale
            entry = prepare_dataset(job, root, out, style=prompt_style, cap=cap, negatives=negatives,
                                    settings=settings, progress=progress)
            for warning in entry["warnings"]:
                _warn(f"{job.name}: {warning}")
            manifest["datasets"][job.name] = entry
            _save_manifest(out, manifest)
            prepared.append(job.name)
        if tfds and not (done and entry.get("tfds")):
            entry["tfds"] = _build_tfds(out, job.name, root)
            _save_manifest(out, manifest)
    earlier = {k: v for k, v in (manifest.get("missing") or {}).items()
               if k not in names and k not in manifest["datasets"]}
    manifest["missing"] = {**earlier, **missing}
    styles = {e.get("prompt_style") for e in manifest["datasets"].values() if isinstance(e, dict)}
    manifest["prompt_style"] = styles.pop() if len(styles) == 1 else "mixed"
    if manifest["prompt_style"] == "mixed":
        _warn(f"{out} now holds data sets prepared in different prompt styles; a training run reads them in one "
              f"(see each data set's prompt_style in {out / PREPARED_MANIFEST})")
    _save_manifest(out, manifest)
    for name, why in missing.items():
        _warn(f"{name}: missing: {why}")
    return {"prepared": prepared, "skipped": skipped, "missing": missing, "manifest": manifest}


TFDS_DIR = "tfds"


TFDS_BUILDER = "mmeb_train"  # tfds_mmeb.BUILDER_NAME (named here so that TFDS is imported only with --tfds)


def _drop_tfds(out: Path, name: str) -> None:
    built = out / TFDS_DIR / TFDS_BUILDER / name
    if built.exists():
        shutil.rmtree(built)


def _build_tfds(out: Path, name: str, root: Path) -> dict:
    from btoks_jax.data.tfds_mmeb import build_tfds

    # keeps a complete earlier build
    build_tfds(out / f"{name}.jsonl", name, out / TFDS_DIR, image_root=out, media_roots=(root,))
    return {"data_dir": TFDS_DIR, "name": name, "complete": True}
