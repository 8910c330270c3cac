"""Readers of the 36 MMEB-V2 image sets (classification, QA, retrieval, grounding), in both prompt styles.

Files (see `common.py` for the root layout):

    ROOT/ziyjiang/MMEB_Test_Instruct/<Task>/test-*.parquet    the annotations VLM2Vec's readers load
    ROOT/TIGER-Lab/MMEB-V2/image-tasks/MMEB/<Task>/...        the images (`image-tasks/mmeb_v1.tar.gz`, extracted)

Columns: `qry_inst`, `qry_text`, `qry_img_path` (str), `tgt_inst` (str), `tgt_text`, `tgt_img_path`
(list[str], "" where a side has no text or no image). Element 0 of the target lists is the positive.
The older `TIGER-Lab/MMEB-eval` shape is read as well (`ROOT/TIGER-Lab/MMEB-eval/<Task>/test-*.parquet`, used
when the instruct copy is absent): no `qry_inst`, and `qry_text` / `tgt_text` hold the finished prompts
(`<|image_1|>\\n{instruction} {question}\\n`); VLM2Vec's parsers rebuild these from the instruct columns ("to
stay consistent with v1 eval"), and the authors read this shape (`data/conversion/mmeb_v2/image.py`).

Image paths. The rows' image paths start at the folder that holds the task folders. The archive unpacks to
`image-tasks/MMEB/<Task>/...`; VLM2Vec's download script then moves `MMEB/*` up one level and points
`image_root` at `image-tasks/` (`experiments/public/data/download_data.sh`, `experiments/public/eval/image.yaml`),
while the authors read `image-tasks/MMEB` in place (`data/conversion/mmeb_v2/datasets.py`, `IMAGE_MEDIA_ROOT`).
Both reach the same files: `image-tasks/MMEB/` is used when present, else `image-tasks/` when it holds the task's
folder (VLM2Vec's moved layout). Images are checked to exist, not decoded.

Prompt styles. Items carry finished prompts with the MMEB placeholder `<|image_1|>` (`instruction=""`), which
`btoks_jax.api.item_prompt` turns into Qwen2-VL pads.

- "vlm2vec" follows VLM2Vec's five parsers (`src/data/eval_dataset/image_{cls,qa,i2t,t2i,i2i_vg}_*.py`) with
  `process_input_text` (`src/model/processor.py`): `fix` below is their `replace(" \\n", "\\n")`.
- "btoks" is the authors' default `runtime_mode: canonical`. Their parsers
  (`src/vlm2emb/data/datasets/mmeb_v2/parsers/image_*.py`) run on the finished MMEB-eval prompts, i.e. on the
  "vlm2vec" text, and rewrite only what `_canonical_query` / `_canonical_candidate` list; their converter also
  rules on blank text candidates (`_authors_text_candidates`). Everything else is the "vlm2vec" text unchanged.

One deviation from VLM2Vec in both styles: a side without an image never keeps the placeholder. VLM2Vec writes a
bare `<|image_pad|>` into such a text-only query when the instruction names one, and embeds it without
pixels; here the placeholder is dropped, as the authors do for WebQA and EDIS
(`parsers/image_t2i.py`, `enforce_text_only_query_visual_token_alignment`), since a pad without pixels is not
a valid input to this processor.

Candidates. VLM2Vec embeds each candidate name once per data set, the first occurrence winning
(`generate_cand_dataset` in `src/data/eval_dataset/base_eval_dataset.py`); the names are the text (text
candidates), the image path (t2i) or `path + ":" + caption.strip('"')` (i2i/grounding). The readers keep one
Item per name, the first one built, so equal names are equal Items and share one embedding, as there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from btoks_jax import fs
from btoks_jax.data.media import RowError
from btoks_jax.evaluate.mmeb import MMEB_V2_DATASETS, EvalRow, Item
from btoks_jax.evaluate.published.common import (
    IMAGE,
    MissingData,
    Task,
    check_style,
    field,
    iter_parquet,
    read_schema,
    repo_dir,
    split_files,
)

Loader = Callable[[Path | str, str, Path | str], Task]  # (root, style, media_dir): local paths or URLs

ANNOTATIONS = "ziyjiang/MMEB_Test_Instruct"
OLD_ANNOTATIONS = "TIGER-Lab/MMEB-eval"
MEDIA = "TIGER-Lab/MMEB-V2"

# The parser VLM2Vec's `experiments/public/eval/image.yaml` assigns to each set (the authors use the same split,
# `data/conversion/mmeb_v2/datasets.py`).
PARSERS: dict[str, tuple[str, ...]] = {
    "image_cls": ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
                  "ImageNet-R", "ObjectNet", "Country211"),
    "image_qa": ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz",
                 "GQA", "TextVQA"),
    "image_i2t": ("MSCOCO_i2t", "VisualNews_i2t"),
    "image_t2i": ("VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ"),
    "image_i2i_vg": ("CIRR", "NIGHTS", "OVEN", "FashionIQ", "MSCOCO", "RefCOCO", "RefCOCO-Matching",
                     "Visual7W-Pointing"),
}
PARSER_OF: dict[str, str] = {name: parser for parser, names in PARSERS.items() for name in names}
TEXT_CANDIDATES = ("image_cls", "image_qa", "image_i2t")  # candidates are label / answer / caption strings

# The authors' candidate sentence for cropped objects, completed with a period and a newline in canonical mode
# (`parsers/image_i2i_vg.py`, `canonical_cropped_object_candidate_sentence`, set for these three sets).
CROPPED_OBJECT = "Represent the given cropped image of the object"
CROPPED_OBJECT_SETS = ("Visual7W-Pointing", "MSCOCO", "RefCOCO")
# Legacy placeholders the authors normalise along with `<|image_1|>` (`datasets/const.py`, LEGACY_IMAGE_TOKENS).
LEGACY_IMAGE_TOKENS = (IMAGE, "<image>")


# ===================================== VLM2Vec's text rules =====================================


def _fix(text: str) -> str:
    """VLM2Vec's "to stay consistent with v1 eval" repair."""
    return text.replace(" \n", "\n")


def _with_image_token(instruction: str, text: str = "") -> str:
    """`process_input_text(instruction, text=text, add_image_token=True)` for Qwen2-VL: `T instruction[ text]`."""
    prompt = instruction + " " + text if text else instruction
    return IMAGE + " " + prompt


def _image_query(parser: str, qry_inst: str, qry_text: str) -> str:
    """The query with its image: cls and i2t drop the placeholder from the instruction as it is
    (`image_cls_dataset.py`, `image_i2t_eval.py`); qa and i2i_vg also strip it and start it on a new line
    (`image_qa_dataset.py`, `image_i2i_vg_dataset.py`). Then fix and one final newline."""
    instruction = qry_inst.replace(IMAGE, "")
    if parser in ("image_qa", "image_i2i_vg"):
        instruction = "\n" + instruction.strip()
    return _fix(_with_image_token(instruction, qry_text)) + "\n"


def _text_query(name: str, qry_inst: str, qry_text: str) -> str:
    """t2i (`image_t2i_eval.py`): `qry_inst qry_text\\n`, with VisDial's extra newline; no image."""
    text = qry_inst + " " + qry_text + "\n"
    return text + "\n" if name == "VisDial" else text


def _image_candidates(parser: str, tgt_inst: str, captions: list[str]) -> list[str]:
    """t2i and i2i_vg candidate prompts (`image_t2i_eval.py`, `image_i2i_vg_dataset.py`): with a non-blank first
    caption, `fix(T inst caption)\\n` for each; else `fix(T inst)\\n` for all, without the newline in i2i_vg."""
    instruction = tgt_inst.replace(IMAGE, "")
    if captions[0].strip():
        return [_fix(_with_image_token(instruction + " " + caption)) + "\n" for caption in captions]
    tail = "" if parser == "image_i2i_vg" else "\n"
    return [_fix(_with_image_token(instruction)) + tail] * len(captions)


def _without_placeholder(text: str, style: str) -> str:
    """A text-only side's prompt with its image placeholder removed. "btoks": the authors'
    `strip_legacy_image_tokens` (`parsers/shared.py`): tokens out, whitespace normalised, leading newlines off."""
    if style == "btoks":
        for token in LEGACY_IMAGE_TOKENS:
            text = text.replace(token, "")
        return _normalize_whitespace(text).lstrip("\n")
    return text.replace(IMAGE, "").lstrip()


# ===================================== the authors' canonical rewrites =====================================


def _normalize_whitespace(text: str, ensure_trailing_newline: bool = False) -> str:
    """The authors' `normalize_text_whitespace` (`datasets/const.py`): line ends unified, spaces and tabs
    trimmed at the end of every line and at both ends; a blank text becomes ""."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n")).strip(" \t")
    if not text.strip(" \t\n"):
        return ""
    return text.rstrip("\n") + "\n" if ensure_trailing_newline else text


def _legacy_to_placeholder(text: str) -> str:
    for token in LEGACY_IMAGE_TOKENS[1:]:
        text = text.replace(token, IMAGE)
    return text


def _canonical_query(name: str, text: str, has_image: bool) -> str:
    if has_image:
        text = _legacy_to_placeholder(text)
    if name == "VizWiz":
        # parsers/image_qa.py `_finalize_image_qa_query_text` (`canonical_query_whitespace_normalization`,
        # VizWiz only): stray spaces before the final newline go.
        text = _normalize_whitespace(text, ensure_trailing_newline=text.endswith("\n"))
    elif name == "VisDial":
        # parsers/image_t2i.py: `canonical_trim_single_extra_blank_line` drops one of the two final newlines,
        # then `_canonicalize_dialog_instruction_separator` puts the dialogue on the line after the instruction.
        if text.endswith("\n\n"):
            text = text[:-1]
        prefix, separator, body = text.partition(": ")
        if separator and (body.startswith("Q:") or "\nQ:" in body or "\nA:" in body):
            text = f"{prefix}:\n{body}"
    return text


def _canonical_candidate(name: str, text: str) -> str:
    """An image candidate's prompt in the authors' canonical mode."""
    text = _legacy_to_placeholder(text)
    if name == "VisDial" and text.startswith(IMAGE):
        # parsers/image_t2i.py `_canonicalize_image_token_block_layout` (`canonical_candidate_block_layout`):
        # token, newline, body, keeping a final newline if there was one.
        body = text[len(IMAGE):].lstrip(" \n")
        if not body:
            return IMAGE + "\n"
        return IMAGE + "\n" + body.rstrip("\n") + ("\n" if text.endswith("\n") else "")
    if name in CROPPED_OBJECT_SETS:
        # parsers/image_i2i_vg.py `_canonicalize_cropped_object_candidate_sentence`.
        stripped = text.rstrip("\n")
        if stripped.startswith(IMAGE + "\n") and stripped[len(IMAGE) + 1:].strip() in (CROPPED_OBJECT,
                                                                                       CROPPED_OBJECT + "."):
            return f"{IMAGE}\n{CROPPED_OBJECT}.\n"
    return text


# ===================================== reading =====================================


def _image_root(root: Path | str, name: str) -> Path | str:
    tasks = fs.joinpath(repo_dir(root, MEDIA), "image-tasks")
    if fs.isdir(fs.joinpath(tasks, "MMEB")):
        return fs.joinpath(tasks, "MMEB")
    if fs.isdir(fs.joinpath(tasks, name)):
        return tasks
    raise MissingData(f"{name}: no images (expected {fs.joinpath(tasks, 'MMEB')} from extracting "
                      f"{fs.joinpath(tasks, 'mmeb_v1.tar.gz')}, or {fs.joinpath(tasks, name)})")


def _annotation_files(root: Path | str, name: str) -> list[Path | str]:
    try:
        return split_files(repo_dir(root, ANNOTATIONS), "test", config=name)
    except MissingData as instruct_missing:
        try:
            return split_files(repo_dir(root, OLD_ANNOTATIONS), "test", config=name)
        except MissingData:
            raise MissingData(f"{name}: no annotations ({instruct_missing}; nor the older {OLD_ANNOTATIONS})") \
                from None


def _columns(parser: str, instruct: bool) -> list[str]:
    if not instruct:  # the finished prompts sit in qry_text / tgt_text
        return ["qry_text", "tgt_text"] + ([] if parser == "image_t2i" else ["qry_img_path"]) \
            + ([] if parser in TEXT_CANDIDATES else ["tgt_img_path"])
    columns = ["qry_inst", "qry_text", "tgt_text"]
    if parser != "image_t2i":
        columns.append("qry_img_path")
    if parser not in TEXT_CANDIDATES:
        columns += ["tgt_inst", "tgt_img_path"]
    return columns


def _string(record: dict, name: str, source: str) -> str:
    value = field(record, name, source, str, allow_none=True)
    return "" if value is None else value


def _strings(record: dict, name: str, source: str) -> list[str]:
    value = field(record, name, source, list)
    if not value:
        raise RowError(name, "empty list: a row needs at least its positive").at(source)
    for index, entry in enumerate(value):
        if entry is not None and not isinstance(entry, str):
            raise RowError(name, f"entry {index + 1}: expected a string, got {type(entry).__name__}").at(source)
    return ["" if entry is None else entry for entry in value]


class _Images:
    """Resolves row image paths under the image root (local or a URL), checking each distinct file once (for URLs
    with one listing per folder)."""

    def __init__(self, root: Path | str):
        self.root = fs.absolute(root)
        self.seen: set[str] = set()
        self.files = fs.FileIndex()

    def __call__(self, relative: str, source: str, name: str, entry: int | None = None) -> str:
        where = "" if entry is None else f"entry {entry + 1}: "
        if not relative.strip():
            raise RowError(name, f"{where}no image path").at(source)
        path = fs.join(self.root, relative)
        if path not in self.seen:
            if not self.files.isfile(path):
                raise RowError(name, f"{where}image file not found: {path}").at(source)
            self.seen.add(path)
        return path


def _load(name: str, root: Path | str, style: str, media_dir: Path | str | None = None) -> Task:
    """Reads one image set (`root` local or a URL). `media_dir` is unused: these sets keep their images as files."""
    del media_dir
    check_style(style)
    root = fs.as_path(root)
    parser = PARSER_OF[name]
    files = _annotation_files(root, name)
    images = _Images(_image_root(root, name))
    instruct = "qry_inst" in read_schema(files[0]).names
    pool: dict[str, Item] = {}  # candidate name -> the Item of its first occurrence
    rows = []
    for source, record in iter_parquet(files, _columns(parser, instruct)):
        query, candidates = _parse(name, parser, style, instruct, record, source, images, pool)
        rows.append(EvalRow(query=query, candidates=candidates,
                            relevance=(1.0,) + (0.0,) * (len(candidates) - 1)))
    return Task(name=name, rows=rows, ranking="local", source=str(fs.parent(files[0])))


def _parse(name: str, parser: str, style: str, instruct: bool, record: dict, source: str, images: _Images,
           pool: dict[str, Item]) -> tuple[Item, tuple[Item, ...]]:
    qry_text = _string(record, "qry_text", source)
    targets = _strings(record, "tgt_text", source)

    # ---- the query
    if parser == "image_t2i":
        image = None
        text = _text_query(name, _string(record, "qry_inst", source), qry_text) if instruct else qry_text
    else:
        image = images(_string(record, "qry_img_path", source), source, "qry_img_path")
        text = _image_query(parser, _string(record, "qry_inst", source), qry_text) if instruct else qry_text
    if image is None and any(token in text for token in (LEGACY_IMAGE_TOKENS if style == "btoks" else (IMAGE,))):
        text = _without_placeholder(text, style)
    if style == "btoks":
        text = _canonical_query(name, text, image is not None)
    query = Item(text=text, image=image)

    # ---- the candidates
    if parser in TEXT_CANDIDATES:
        if style == "btoks":
            targets = _authors_text_candidates(name, targets, source)
        return query, tuple(Item(text=target) for target in targets)

    paths = _strings(record, "tgt_img_path", source)
    if len(paths) != len(targets):
        raise RowError("tgt_img_path", f"{len(paths)} entries but tgt_text has {len(targets)}").at(source)
    if parser == "image_t2i":
        names = paths
    else:
        names = [path + ":" + caption.strip('"') for path, caption in zip(paths, targets)]
    texts = _image_candidates(parser, _string(record, "tgt_inst", source), targets) if instruct else targets
    candidates = []
    for index, (key, path, text) in enumerate(zip(names, paths, texts)):
        item = pool.get(key)
        if item is None:
            image = images(path, source, "tgt_img_path", index)
            item = pool[key] = Item(text=_canonical_candidate(name, text) if style == "btoks" else text,
                                    image=image)
        candidates.append(item)
    return query, tuple(candidates)


def _authors_text_candidates(name: str, targets: list[str], source: str) -> list[str]:
    """The authors' converter on text candidates (`data/conversion/mmeb_v2/image.py`,
    `_validate_text_candidate_groups`): OK-VQA drops blank ones (the positive must stay); any other set with a
    blank candidate is rejected."""
    blank = [i for i, target in enumerate(targets) if not target.strip()]
    if not blank:
        return targets
    if name == "OK-VQA" and blank[0] != 0:
        return [target for target in targets if target.strip()]
    raise RowError("tgt_text", f"entry {blank[0] + 1} is blank, which the authors' converter rejects"
                   + (" for the positive" if blank[0] == 0 else "")).at(source)


# ===================================== the table =====================================

TASKS: dict[str, Loader] = {spec.name: functools.partial(_load, spec.name)
                            for spec in MMEB_V2_DATASETS if spec.modality == "image"}

if set(TASKS) != set(PARSER_OF):  # the two name lists must not drift apart
    raise RuntimeError(f"image readers out of step with MMEB_V2_DATASETS: {sorted(set(TASKS) ^ set(PARSER_OF))}")

__all__ = ["TASKS", "Loader", "PARSERS"]
