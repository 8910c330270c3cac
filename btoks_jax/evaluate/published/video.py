"""Readers for the 18 MMEB-V2 video sets: annotations from the hub, frames from the MMEB-V2 frame archives.

Where things are (VLM2Vec `experiments/public/eval/video.yaml`, `src/constant/dataset_hf_path.py`):

    ROOT/VLM2Vec/<Name>/...                      annotations, one split of parquet shards (`split_files`);
                                                 MSR-VTT config `test_1k`, NExTQA `MC`, EgoSchema `Subset`,
                                                 MVBench its 20 task configs (split `train`, concatenated)
    ROOT/lmms-lab/YouCook2/...                   YouCook2 annotations, split `val`
    ROOT/TIGER-Lab/MMEB-V2/video-tasks/frames/   the extracted frame archives:
        video_cls/<K700|SSv2|UCF101|HMDB51|Breakfast>/<video_id>/
        video_ret/<MSR-VTT|MSVD|DiDeMo|VATEX|YouCook2>/<video id>/
        video_qa/<Video-MME|NExTQA|EgoSchema|ActivityNetQA>/<video id>/   (ActivityNetQA: `v_<video_name>`)
        video_qa/MVBench/<config>/<video file name>/
        video_mret/<QVHighlight|Charades_STA>/<video stem>/{query, positive*, <other clip folders>}/
        video_mret/MomentSeeker/video_frames/<clip path, "/" -> "_", minus ".mp4">/  (+ query images)

Where VLM2Vec and the authors' converter (`src/vlm2emb/data/conversion/mmeb_v2/datasets.py`) name a frame folder
differently, both are accepted, VLM2Vec's first: `video_cls/<Name>` or `<Name>`, `video_qa/EgoSchema` or
`video_qa/egoschema`, `video_mret/Charades_STA` or `video_mret/Charades-STA`, `video_ret/<Name>` or
`data/ziyan/video_retrieval/<Name>/frames`.

Frames. A folder's .jpg/.jpeg/.png files in natural order; with 8 or more, 8 picked by `linspace(0, n-1, 8)`,
else all of them (`common.pick_frames`, VLM2Vec `process_video_frames`). MomentSeeker's folders are picked the
same way (VLM2Vec feeds all their frames, at most the 8 it would extract itself). A video whose folder is missing
or holds no frame image is an error naming the file, row, field and folder: VLM2Vec would then extract frames
from the raw `.mp4`, which this reader does not do. Media are read in place; `media_dir` is unused.

Rows. Each query becomes one `EvalRow`. Local sets list their candidates with grades 1.0 (the answer, the
positive clips) and 0.0. Global sets (K700, HMDB51, UCF101, Breakfast and the five retrieval sets) list only the
relevant item and put the whole pool in `Task.corpus`: the 700/51/101/10 labels of VLM2Vec's hard-coded lists
(`video_labels.json`, from its `video_classification_utils.py`), or every distinct video of the set. SmthSmthV2
is cut to its first 1000 rows (`num_sample_per_subset`); every other set is read whole.

Prompt styles (items carry finished prompts with the `<|video_1|>` / `<|image_1|>` placeholders):

- "vlm2vec": VLM2Vec's readers (`src/data/eval_dataset/*.py`, `process_input_text`): token, one space, text;
  the QA prompt ends in "Question: " and is joined to the question with another space; options as each reader
  builds them (Video-MME one per line, EgoSchema joined by spaces straight after the question, NExTQA and
  MVBench `\\nOptions:\\n(A) ...`, ActivityNetQA `? (A) yes; (B) no.`); Video-MME/EgoSchema candidates lose
  their `X. ` prefix and trailing dots; MVBench candidates keep `(X) `.
- "btoks": the authors' canonical runtime form (`src/vlm2emb/data/datasets/mmeb_v2/parsers/*.py`,
  `runtime_mode: canonical`): token, newline, the same body, one final newline; questions, queries and captions
  (and NExTQA/MVBench options and candidates) whitespace-normalised as `normalize_text_whitespace` in
  `src/vlm2emb/data/datasets/const.py` does; Breakfast's instruction loses its trailing space; Video-MME and
  EgoSchema candidates are the raw options (`A. Apples.`). The candidate pools are MMEB's in both styles.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from btoks_jax import fs
from btoks_jax.data.media import RowError
from btoks_jax.evaluate.mmeb import MMEB_V2_BY_NAME, EvalRow, Item
from btoks_jax.evaluate.published.common import (
    IMAGE,
    VIDEO,
    MissingData,
    Task,
    check_style,
    field,
    iter_parquet,
    list_frames,
    natural_key,
    pick_frames,
    repo_dir,
    split_files,
)

Loader = Callable[[Path | str, str, Path | str], Task]  # (root, style, media_dir): local paths or URLs

FRAMES = "TIGER-Lab/MMEB-V2/video-tasks/frames"
QA_PROMPT = ("Given a video and a question, select the most accurate answer from the provided candidates. "
             "Return only the exact text of your chosen answer. Question: ")
VIDEO_TARGET = "Understand the content of the provided video."
MVBENCH_CONFIGS = (
    "episodic_reasoning", "action_sequence", "action_prediction", "action_antonym", "fine_grained_action",
    "unexpected_action", "object_existence", "object_interaction", "object_shuffle", "moving_direction",
    "action_localization", "scene_transition", "action_count", "moving_count", "moving_attribute", "state_change",
    "fine_grained_pose", "character_order", "egocentric_navigation", "counterfactual_inference",
)


@functools.cache
def class_labels() -> dict[str, tuple[str, ...]]:
    """VLM2Vec's hard-coded label lists, {set name: labels} (K700, SmthSmthV2, UCF101, HMDB51, Breakfast)."""
    with open(Path(__file__).with_name("video_labels.json"), encoding="utf-8") as f:
        return {name: tuple(labels) for name, labels in json.load(f).items()}


# ===================================== shared pieces =====================================


def _prompt(style: str, instruction: str, text: str = "", token: str = "") -> str:
    """Both sides' `process_input_text`: instruction, a space and the text (when non-empty), the token in front;
    then VLM2Vec joins the token with a space, the authors' canonical form with a newline and ends the prompt
    with one newline."""
    body = f"{instruction} {text}" if text else instruction
    if style == "vlm2vec":
        return f"{token} {body}" if token else body
    return (f"{token}\n{body}" if token else body) + "\n"


def _normalize(text: str) -> str:
    """The authors' `normalize_text_whitespace(text).rstrip("\\n")`: CR/CRLF to LF, spaces and tabs dropped at
    line ends and around the whole text; blank text becomes ""."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n")).strip(" \t")
    return "" if not text.strip(" \t\n") else text.rstrip("\n")


def _choices(question: str, options: Iterable[str]) -> str:
    """`question\\nOptions:\\n(A) a\\n(B) b...` with trailing whitespace cut (VLM2Vec `qa_template`)."""
    lines = "".join(f"({chr(ord('A') + i)}) {option}\n" for i, option in enumerate(options))
    return f"{question}\nOptions:\n{lines}".rstrip()


def _strip_option(option: str) -> str:
    """VLM2Vec's Video-MME/EgoSchema candidate, `o[o.find('. '):].strip('. ')` (`A. Apples.` -> `Apples`)."""
    return option[option.find(". "):].strip(". ")


def _strings(record: dict, name: str, source: str) -> list[str]:
    values = field(record, name, source, list)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise RowError(name, f"element {i}: expected str, got {type(value).__name__}").at(source)
    return values


def _frames(folder: Path, source: str, field_name: str) -> tuple[str, ...]:
    frames = list_frames(folder)
    if not frames:
        raise RowError(field_name, f"no frame images (.jpg/.jpeg/.png) in {folder} (VLM2Vec would extract them "
                                   "from the raw video; this reader does not decode videos)").at(source)
    return pick_frames(frames)


def _video(folder: Path, text: str, source: str, field_name: str) -> Item:
    return Item(text=text, video=_frames(folder, source, field_name))


def _frame_root(root: Path, name: str, folders: tuple[str, ...]) -> Path:
    for folder in folders:
        path = fs.joinpath(root, *FRAMES.split("/"), folder)
        if fs.isdir(path):
            return path
    raise MissingData(f"{name}: frames not extracted (looked for "
                      + ", ".join(str(fs.joinpath(root, *FRAMES.split("/"), f)) for f in folders) + ")")


def _rows(files: list[Path], columns: tuple[str, ...], limit: int | None = None) -> Iterator[tuple[str, dict]]:
    return itertools.islice(iter_parquet(files, columns), limit)


def _graded(query: Item, texts: list[str], answer: int) -> EvalRow:
    return EvalRow(query, tuple(Item(text=t) for t in texts),
                   tuple(1.0 if i == answer else 0.0 for i in range(len(texts))))


def _task(name: str, rows: list[EvalRow], source: Path, corpus: Iterable[Item] = ()) -> Task:
    return Task(name=name, rows=rows, ranking=MMEB_V2_BY_NAME[name].ranking, corpus=tuple(corpus),
                source=str(source))


# ===================================== classification =====================================


@dataclasses.dataclass(frozen=True)
class _Cls:
    repo: str
    frames: tuple[str, ...]
    instruction: str  # VLM2Vec `DATASET_INSTRUCTION`, verbatim (Breakfast's ends in a space)
    limit: int | None = None


_CLS = {
    "K700": _Cls("VLM2Vec/Kinetics-700", ("video_cls/K700", "K700"), "Recognize the category of the video content."),
    "SmthSmthV2": _Cls("VLM2Vec/SmthSmthV2", ("video_cls/SSv2", "SSv2"),
                       "What actions or object interactions are being performed by the person in the video?", 1000),
    "HMDB51": _Cls("VLM2Vec/HMDB51", ("video_cls/HMDB51", "HMDB51"),
                   "What actions or objects interactions are the person in the video doing?"),
    "UCF101": _Cls("VLM2Vec/UCF101", ("video_cls/UCF101", "UCF101"),
                   "What activities or sports are being performed by the person in the video?"),
    "Breakfast": _Cls("VLM2Vec/Breakfast", ("video_cls/Breakfast", "Breakfast"),
                      "Recognize the breakfast type that the person is cooking in the video. "),
}


def _load_cls(name: str, root: Path, style: str, media_dir: Path) -> Task:
    """Query: the video; candidates: label texts. SmthSmthV2 ranks each row's `neg_text` list (all labels, the
    positive among them; the authors put `pos_text` first and drop repeats), the others the full label list."""
    spec, style = _CLS[name], check_style(style)
    repo = repo_dir(root, spec.repo)
    files = split_files(repo, "test")
    frame_root = _frame_root(root, name, spec.frames)
    local = name == "SmthSmthV2"
    instruction = spec.instruction if style == "vlm2vec" else spec.instruction.rstrip()
    text = _prompt(style, instruction, token=VIDEO)
    rows = []
    for source, record in _rows(files, ("video_id", "pos_text") + (("neg_text",) if local else ()), spec.limit):
        video_id = field(record, "video_id", source, (str, int) if local else str)
        label = field(record, "pos_text", source)
        query = _video(fs.joinpath(frame_root, str(video_id)), text, source, "video_id")
        if not local:
            rows.append(EvalRow(query, (Item(text=label),), (1.0,)))
            continue
        labels = _strings(record, "neg_text", source)
        if style == "btoks":
            labels = list(dict.fromkeys([label, *labels]))
        elif label not in labels:
            raise RowError("neg_text", f"the label {label!r} (pos_text) is not among the candidates").at(source)
        rows.append(_graded(query, labels, labels.index(label)))
    corpus = () if local else (Item(text=label) for label in class_labels()[name])
    return _task(name, rows, repo, corpus)


# ===================================== text-to-video retrieval =====================================


@dataclasses.dataclass(frozen=True)
class _Ret:
    repo: str
    config: str | None
    split: str
    instruction: str
    columns: tuple[str, ...]
    id_field: str  # the frame folder's name; DiDeMo: the stem of `video`
    caption_field: str
    caption_list: bool  # MSVD and VATEX list captions; the first is the query


def _ret(repo, instruction, columns, id_field, caption_field, caption_list=False, config=None, split="test"):
    return _Ret(repo, config, split, instruction, columns, id_field, caption_field, caption_list)


_RET = {
    "DiDeMo": _ret("VLM2Vec/DiDeMo", "Find a video that includes the following described scenes:",
                   ("video", "caption"), "video", "caption"),
    "MSR-VTT": _ret("VLM2Vec/MSR-VTT", "Find a video that contains the following visual content:",
                    ("video_id", "video", "caption"), "video_id", "caption", config="test_1k"),
    "MSVD": _ret("VLM2Vec/MSVD", "Find the video snippet that corresponds to the given summary:",
                 ("video_id", "video", "caption"), "video_id", "caption", caption_list=True),
    "VATEX": _ret("VLM2Vec/VATEX", "Select a video that fits the description provided:",
                  ("videoID", "enCap"), "videoID", "enCap", caption_list=True),
    "YouCook2": _ret("lmms-lab/YouCook2", "Find a video that demonstrates the following action while making a recipe:",
                     ("id", "video_path", "sentence"), "id", "sentence", split="val"),
}


def _caption(spec: _Ret, record: dict, source: str, style: str) -> str:
    if not spec.caption_list:
        caption = field(record, spec.caption_field, source)
    elif style == "vlm2vec":
        captions = _strings(record, spec.caption_field, source)
        if not captions:
            raise RowError(spec.caption_field, "empty caption list").at(source)
        caption = captions[0]
    else:  # the authors take the first non-blank caption
        caption = next((c for c in _strings(record, spec.caption_field, source) if c.strip()), "")
    return caption if style == "vlm2vec" else _normalize(caption)


def _load_ret(name: str, root: Path, style: str, media_dir: Path) -> Task:
    """Query: the caption, no media; candidate: the captioned video. Ranking is global over every distinct video."""
    spec, style = _RET[name], check_style(style)
    repo = repo_dir(root, spec.repo)
    files = split_files(repo, spec.split, spec.config)
    frame_root = _frame_root(root, name, (f"video_ret/{name}", f"data/ziyan/video_retrieval/{name}/frames"))
    target = _prompt(style, VIDEO_TARGET, token=VIDEO)
    rows, videos = [], {}
    for source, record in _rows(files, spec.columns):
        video_id = field(record, spec.id_field, source)
        if name == "DiDeMo":
            video_id = os.path.splitext(os.path.basename(video_id))[0]
        if video_id not in videos:
            videos[video_id] = _video(fs.joinpath(frame_root, video_id), target, source, spec.id_field)
        query = Item(text=_prompt(style, spec.instruction, _caption(spec, record, source, style)))
        rows.append(EvalRow(query, (videos[video_id],), (1.0,)))
    return _task(name, rows, repo, videos.values())


# ===================================== video question answering =====================================
# Each parser returns (frame folder, its field, query text, candidate texts, index of the answer).


def _videomme(record: dict, source: str, style: str, frames: Path):
    question, options = field(record, "question", source), _strings(record, "options", source)
    answer = field(record, "answer", source)
    if answer not in ("A", "B", "C", "D") or "ABCD".index(answer) >= len(options):
        raise RowError("answer", f"expected the letter of one of the {len(options)} options, got {answer!r}").at(source)
    if style == "btoks":
        question = _normalize(question)
    text = _prompt(style, QA_PROMPT, question + "\n" + "\n".join(options), VIDEO)
    candidates = [_strip_option(o) for o in options] if style == "vlm2vec" else options
    return fs.joinpath(frames, field(record, "videoID", source)), "videoID", text, candidates, "ABCD".index(answer)


def _nextqa(record: dict, source: str, style: str, frames: Path):
    question = field(record, "question", source)
    options = [field(record, f"a{i}", source) for i in range(5)]
    answer = field(record, "answer", source, int)
    if not 0 <= answer < len(options):
        raise RowError("answer", f"expected an option index 0-4, got {answer}").at(source)
    if style == "btoks":
        question, options = _normalize(question), [_normalize(o) for o in options]
    video = field(record, "video", source, (str, int))
    text = _prompt(style, QA_PROMPT, _choices(question, options), VIDEO)
    return fs.joinpath(frames, str(video)), "video", text, options, answer


def _egoschema(record: dict, source: str, style: str, frames: Path):
    question, options = field(record, "question", source), _strings(record, "option", source)
    answer = field(record, "answer", source, (str, int))
    try:
        index = int(answer)
    except ValueError:
        raise RowError("answer", f"expected an option index, got {answer!r}").at(source) from None
    if not 0 <= index < len(options):
        raise RowError("answer", f"option index {index} out of range for {len(options)} options").at(source)
    if style == "btoks":
        question = _normalize(question)
    text = _prompt(style, QA_PROMPT, question + " ".join(options), VIDEO)  # no separator after the question
    candidates = [_strip_option(o) for o in options] if style == "vlm2vec" else options
    return fs.joinpath(frames, field(record, "video_idx", source)), "video_idx", text, candidates, index


def _mvbench(record: dict, source: str, style: str, frames: Path):
    question, options = field(record, "question", source), _strings(record, "candidates", source)
    answer = field(record, "answer", source)
    matches = [i for i, option in enumerate(options) if option == answer]
    if not matches:
        raise RowError("answer", f"{answer!r} is not among the candidates").at(source)
    labelled = [f"({chr(ord('A') + i)}) {option}" for i, option in enumerate(options)]
    if style == "vlm2vec":  # `qa_template` keeps the last match, the authors' converter the first
        text, index = _prompt(style, QA_PROMPT, _choices(question, options), VIDEO), matches[-1]
    else:
        text = _prompt(style, QA_PROMPT, _choices(_normalize(question), [_normalize(o) for o in options]), VIDEO)
        labelled, index = [_normalize(c) for c in labelled], matches[0]
    folder = fs.joinpath(frames, record["subset"], field(record, "video", source))
    return folder, "video", text, labelled, index


def _activitynetqa(record: dict, source: str, style: str, frames: Path):
    question, answer = field(record, "question", source), field(record, "answer", source)
    if style == "btoks":
        question, answer = _normalize(question), answer.strip().lower()
    if answer not in ("yes", "no"):
        raise RowError("answer", f"expected 'yes' or 'no', got {answer!r}").at(source)
    text = _prompt(style, QA_PROMPT, question + "? (A) yes; (B) no.", VIDEO)
    folder = fs.joinpath(frames, f"v_{field(record, 'video_name', source)}")
    return folder, "video_name", text, ["yes", "no"], ("yes", "no").index(answer)


@dataclasses.dataclass(frozen=True)
class _Qa:
    repo: str
    config: str | None
    split: str
    frames: tuple[str, ...]
    columns: tuple[str, ...]  # what VLM2Vec's reader takes from every row
    parse: Callable


_QA = {
    "MVBench": _Qa("VLM2Vec/MVBench", None, "train", ("video_qa/MVBench",),
                   ("question", "video", "candidates", "answer"), _mvbench),
    "Video-MME": _Qa("VLM2Vec/Video-MME", None, "test", ("video_qa/Video-MME",),
                     ("question", "videoID", "options", "answer", "question_id", "domain", "sub_category"), _videomme),
    "NExTQA": _Qa("VLM2Vec/NExTQA", "MC", "test", ("video_qa/NExTQA",),
                  ("video", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4"), _nextqa),
    "EgoSchema": _Qa("VLM2Vec/EgoSchema", "Subset", "test", ("video_qa/EgoSchema", "video_qa/egoschema"),
                     ("video_idx", "question", "answer", "question_idx", "option"), _egoschema),
    "ActivityNetQA": _Qa("VLM2Vec/ActivityNetQA", None, "test", ("video_qa/ActivityNetQA",),
                         ("video_name", "question", "answer", "question_id"), _activitynetqa),
}


def _qa_shards(spec: _Qa, repo: Path) -> list[tuple[list[Path], str | None]]:
    """(parquet shards, MVBench config) pairs; MVBench reads all 20 configs, each with a `subset` column added."""
    if spec.repo != "VLM2Vec/MVBench":
        return [(split_files(repo, spec.split, spec.config), None)]
    return [(split_files(repo, spec.split, config), config) for config in MVBENCH_CONFIGS]


def _load_qa(name: str, root: Path, style: str, media_dir: Path) -> Task:
    """Query: the video with the question and its options; candidates: the options, the answer graded 1.0."""
    spec, style = _QA[name], check_style(style)
    repo = repo_dir(root, spec.repo)
    shards = _qa_shards(spec, repo)
    frame_root = _frame_root(root, name, spec.frames)
    rows = []
    for files, subset in shards:
        for source, record in _rows(files, spec.columns):
            if subset is not None:
                record["subset"] = subset
            folder, video_field, text, candidates, answer = spec.parse(record, source, style, frame_root)
            rows.append(_graded(_video(folder, text, source, video_field), candidates, answer))
    return _task(name, rows, repo)


# ===================================== moment retrieval =====================================

MOMENT_QUERY = "Find the clip that corresponds to the described scene in the given video:"
SEEKER_TEXT = "Find the clip that corresponds to the given text:"
SEEKER_IMAGE = "Select the video clip that aligns with the given text and image:"
SEEKER_VIDEO = "Find the clip that corresponds to the given sentence and video segment:"
SEEKER_TARGET = "Understand the content of the provided video clip."


def _load_moments(name: str, root: Path, style: str, media_dir: Path) -> Task:
    """QVHighlight, Charades-STA: the query video is `<stem>/query/`, every other sub-folder of `<stem>/` a
    candidate clip, those named `positive*` graded 1.0 (VLM2Vec `moment_retrieval_datasets.py`; files there are
    ignored)."""
    style = check_style(style)
    repo = repo_dir(root, f"VLM2Vec/{name}")
    files = split_files(repo, "test")
    folders = ("video_mret/QVHighlight",) if name == "QVHighlight" else ("video_mret/Charades_STA",
                                                                           "video_mret/Charades-STA")
    frame_root = _frame_root(root, name, folders)
    target = _prompt(style, VIDEO_TARGET, token=VIDEO)
    rows = []
    for source, record in _rows(files, ("query", "video_path")):
        query = field(record, "query", source)
        clip_dir = fs.joinpath(frame_root, os.path.splitext(os.path.basename(field(record, "video_path", source)))[0])
        text = _prompt(style, MOMENT_QUERY, query if style == "vlm2vec" else _normalize(query), VIDEO)
        query_item = _video(fs.joinpath(clip_dir, "query"), text, source, "video_path")
        clips = sorted((p for p in _subfolders(clip_dir) if fs.basename(p) != "query"),
                       key=lambda p: natural_key(fs.basename(p)))
        grades = tuple(1.0 if fs.basename(clip).startswith("positive") else 0.0 for clip in clips)
        if not any(grades):
            raise RowError("video_path", f"no positive* clip folder in {clip_dir}").at(source)
        candidates = tuple(_video(clip, target, source, "video_path") for clip in clips)
        rows.append(EvalRow(query_item, candidates, grades))
    return _task(name, rows, repo)


def _subfolders(folder: Path | str) -> list[Path | str]:
    """The sub-folders of a folder (local: `Path`s; a URL: URL strings, every prefix with objects under it)."""
    if not fs.is_remote(folder):
        return [p for p in Path(folder).iterdir() if p.is_dir()]
    files = set(fs.listfiles(folder))
    return [fs.join(folder, name) for name in fs.listdir(folder) if name not in files]


def _clip_folder(frame_root: Path | str, path: str) -> Path | str:
    return fs.joinpath(frame_root, "video_frames", path.replace("/", "_").split(".mp4")[0])


def _clip_paths(record: dict, name: str, source: str) -> list[str]:
    entries = field(record, name, source, list)
    paths = []
    for i, entry in enumerate(entries):
        path = entry.get("output_path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or not path:
            raise RowError(name, f"element {i}: expected a struct with a non-empty output_path").at(source)
        paths.append(path)
    return paths


def _seeker_query(record: dict, source: str, style: str, frame_root: Path) -> Item:
    """Text, image or video query, by `input_frames`: "" (text), `.jpg` (image) or `.mp4` (video). VLM2Vec tests
    the exact endings; the authors' converter the lower-cased suffix, also taking .jpeg/.png images."""
    query = field(record, "query", source)
    if style == "btoks":
        query = _normalize(query)
    media = field(record, "input_frames", source, allow_none=True) or ""
    suffix = media.lower() if style == "btoks" else media
    if suffix.endswith(".mp4"):
        folder = _clip_folder(frame_root, media)
        return _video(folder, _prompt(style, SEEKER_VIDEO, query, VIDEO), source, "input_frames")
    if suffix.endswith((".jpg",) if style == "vlm2vec" else (".jpg", ".jpeg", ".png")):
        # VLM2Vec: <frame root>/query_<input_frames>; the authors: <frame root>/query_images/<parent>/<file>.
        image_path = Path(media)
        tried = [fs.joinpath(frame_root, f"query_{media}"),
                 fs.joinpath(frame_root, "query_images", image_path.parent.name, image_path.name)]
        image = next((p for p in tried if fs.isfile(p)), None)
        if image is None:
            raise RowError("input_frames", "no query image at " + " or ".join(map(str, tried))).at(source)
        return Item(text=_prompt(style, SEEKER_IMAGE, query, IMAGE), image=str(image))
    if media and style == "btoks":
        raise RowError("input_frames", f"expected '', a .mp4 clip or an image, got {media!r}").at(source)
    return Item(text=_prompt(style, SEEKER_TEXT, query))


def _load_momentseeker(name: str, root: Path, style: str, media_dir: Path) -> Task:
    """Candidates: the row's positive clips (1.0) then its negatives (0.0) (VLM2Vec `momentseeker_dataset.py`)."""
    style = check_style(style)
    repo = repo_dir(root, "VLM2Vec/MomentSeeker")
    files = split_files(repo, "test")
    frame_root = _frame_root(root, name, ("video_mret/MomentSeeker",))
    target = _prompt(style, SEEKER_TARGET, token=VIDEO)
    rows = []
    for source, record in _rows(files, ("query", "input_frames", "positive_frames", "negative_frames")):
        query = _seeker_query(record, source, style, frame_root)
        positives = _clip_paths(record, "positive_frames", source)
        negatives = _clip_paths(record, "negative_frames", source)
        if not positives:
            raise RowError("positive_frames", "no positive clip").at(source)
        candidates = tuple(_video(_clip_folder(frame_root, path), target, source, field_name)
                           for field_name, paths in (("positive_frames", positives), ("negative_frames", negatives))
                           for path in paths)
        rows.append(EvalRow(query, candidates, (1.0,) * len(positives) + (0.0,) * len(negatives)))
    return _task(name, rows, repo)


# ===================================== the table =====================================

TASKS: dict[str, Loader] = {
    **{name: functools.partial(_load_cls, name) for name in _CLS},
    **{name: functools.partial(_load_qa, name) for name in _QA},
    **{name: functools.partial(_load_ret, name) for name in _RET},
    "QVHighlight": functools.partial(_load_moments, "QVHighlight"),
    "Charades-STA": functools.partial(_load_moments, "Charades-STA"),
    "MomentSeeker": functools.partial(_load_momentseeker, "MomentSeeker"),
}
