"""The MMEB-V2 video readers on miniatures of the published layout: prompts, rows, frames, errors (no model).

Expected prompts: "vlm2vec" strings are VLM2Vec's readers' output (`src/data/eval_dataset/*.py`, as tabulated
in MMEB_FORMATS.md 2.2); "btoks" strings are the authors' canonical runtime strings from their audits
(`tests/evaluate/test_mmeb_video_group_{c,d,e}_audit.py`, `runtime_mode: canonical`) with the pads wrapped
in <|vision_start|>..<|vision_end|>, as the BToks style feeds them. Rows the audits do not cover carry
whitespace the two styles treat differently; their expected strings follow the same rules.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mmeb_fixtures import video as fixture

from btoks_jax.api import item_prompt
from btoks_jax.evaluate.mmeb import MMEB_V2_BY_NAME, MMEB_V2_DATASETS, Item
from btoks_jax.evaluate.published.common import STYLES, MissingData
from btoks_jax.evaluate.published.video import TASKS, class_labels

VIDEO_NAMES = [spec.name for spec in MMEB_V2_DATASETS if spec.modality == "video"]
FRAMES = Path("TIGER-Lab/MMEB-V2/video-tasks/frames")
P = ("Given a video and a question, select the most accurate answer from the provided candidates. "
     "Return only the exact text of your chosen answer. Question: ")


def wrapped(text: str) -> str:
    """An authors' string as the btoks style feeds it: bare pads inside vision boundaries."""
    return re.sub(r"<\|(image|video)_pad\|>", r"<|vision_start|><|\1_pad|><|vision_end|>", text)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb_v2")
    return root, fixture.write(root)


@pytest.fixture
def fresh(tmp_path):
    """A private copy to break."""
    fixture.write(tmp_path)
    return tmp_path


def load(root: Path, name: str, style: str):
    return TASKS[name](root, style, root / "media")


def prompts(root: Path, name: str, style: str, row: int = 0) -> tuple[str, list[str]]:
    r = load(root, name, style).rows[row]
    return item_prompt(r.query, style), [item_prompt(c, style) for c in r.candidates]


def check(root: Path, name: str, row: int, vlm2vec: tuple[str, str], btoks: tuple[str, str]) -> None:
    """(query, first candidate) in each style; btoks strings are given in the authors' bare-pad form."""
    for style, (query, candidate) in (("vlm2vec", vlm2vec), ("btoks", tuple(map(wrapped, btoks)))):
        got_query, got_candidates = prompts(root, name, style, row)
        assert got_query == query, (name, style)
        assert got_candidates[0] == candidate, (name, style)


def test_tasks_cover_the_18_video_sets():
    assert sorted(TASKS) == sorted(VIDEO_NAMES) and len(TASKS) == 18
    labels = class_labels()
    assert {name: len(labels[name]) for name in ("K700", "UCF101", "HMDB51", "Breakfast")} == {
        "K700": 700, "UCF101": 101, "HMDB51": 51, "Breakfast": 10}
    assert labels["K700"][0] == "waiting_in_line" and labels["Breakfast"][-1] == "salad"


# ===================================== prompt strings, one test per family =====================================


def test_classification_prompts(published):
    root, _ = published
    cases = {
        "K700": ("Recognize the category of the video content.", "lifting_hat"),
        "UCF101": ("What activities or sports are being performed by the person in the video?", "Knitting"),
        "HMDB51": ("What actions or objects interactions are the person in the video doing?", "pick"),
        "Breakfast": ("Recognize the breakfast type that the person is cooking in the video. ", "milk"),
    }
    for name, (instruction, label) in cases.items():
        check(root, name, 0, (f"<|video_pad|> {instruction}", label),
              (f"<|video_pad|>\n{instruction.rstrip()}\n", label))
    # Breakfast keeps VLM2Vec's trailing space; the authors' canonical form trims it.
    assert prompts(root, "Breakfast", "vlm2vec")[0].endswith("in the video. ")
    assert prompts(root, "Breakfast", "btoks")[0].endswith("in the video.\n")

    ssv2 = "What actions or object interactions are being performed by the person in the video?"
    labels = list(class_labels()["SmthSmthV2"])
    for style, query in (("vlm2vec", f"<|video_pad|> {ssv2}"), ("btoks", wrapped(f"<|video_pad|>\n{ssv2}\n"))):
        got_query, candidates = prompts(root, "SmthSmthV2", style)
        assert got_query == query
        row = load(root, "SmthSmthV2", style).rows[0]
        positive = [c.text for c, g in zip(row.candidates, row.relevance) if g == 1.0]
        assert positive == ["Holding something"] and sorted(candidates) == sorted(labels)
    assert prompts(root, "SmthSmthV2", "vlm2vec")[1] == labels  # VLM2Vec: the row's neg_text as listed
    assert prompts(root, "SmthSmthV2", "btoks")[1][0] == "Holding something"  # the authors: pos_text first


def test_retrieval_prompts(published):
    root, _ = published
    target_v = "<|video_pad|> Understand the content of the provided video."
    target_b = "<|video_pad|>\nUnderstand the content of the provided video.\n"
    cases = {  # name: (instruction, caption of row 0)
        "DiDeMo": ("Find a video that includes the following described scenes:",
                   "we pan right off the mural and on to a building. the view changes from artwork to a building in "
                   "this shot. the screen moves to something dark the camera pans from the end of the mural to "
                   "another structure and then a building."),
        "MSVD": ("Find the video snippet that corresponds to the given summary:",
                 "two young men are playing table tennis"),
        "YouCook2": ("Find a video that demonstrates the following action while making a recipe:",
                     "pick the ends off the verdalago"),
        "VATEX": ("Select a video that fits the description provided:",
                  "A young man is showing the polish, water. old soft cloth and brush needed to polish shoes with."),
        "MSR-VTT": ("Find a video that contains the following visual content:",
                    "a woman creating a fondant baby and flower"),
    }
    for name, (instruction, caption) in cases.items():
        check(root, name, 0, (f"{instruction} {caption}", target_v), (f"{instruction} {caption}\n", target_b))
    # Whitespace: kept by VLM2Vec, normalised (line ends, ends of the text, CRLF) by the authors.
    m = "Find a video that contains the following visual content: "
    assert prompts(root, "MSR-VTT", "vlm2vec", 1)[0] == m + "a man  is talking about a car \n"
    assert prompts(root, "MSR-VTT", "btoks", 1)[0] == m + "a man  is talking about a car\n"
    d = "Find a video that includes the following described scenes: "
    assert prompts(root, "DiDeMo", "vlm2vec", 1)[0] == d + "a dog runs across the yard.\r\nit jumps "
    assert prompts(root, "DiDeMo", "btoks", 1)[0] == d + "a dog runs across the yard.\nit jumps\n"
    v = "Select a video that fits the description provided: "
    assert prompts(root, "VATEX", "btoks", 1)[0] == v + "Two kids play\twith a ball\n"
    y = "Find a video that demonstrates the following action while making a recipe: "
    assert prompts(root, "YouCook2", "btoks", 1)[0] == y + "add the chopped onion to the pan\n"
    # MSVD: VLM2Vec takes caption[0] even when blank; the authors the first non-blank one.
    s = "Find the video snippet that corresponds to the given summary: "
    assert prompts(root, "MSVD", "vlm2vec", 1)[0] == s + "   "
    assert prompts(root, "MSVD", "btoks", 1)[0] == s + "a woman is slicing an onion\n"
    for name in cases:  # text-only queries
        assert all(r.query.video is None and r.query.image is None for r in load(root, name, "btoks").rows)


def test_question_answering_prompts(published):
    root, _ = published
    mme = ("When demonstrating the Germany modern Christmas tree is initially decorated with apples, candles and "
           "berries, which kind of the decoration has the largest number?\n"
           "A. Apples.\nB. Candles.\nC. Berries.\nD. The three kinds are of the same number.")
    check(root, "Video-MME", 0, (f"<|video_pad|> {P} {mme}", "Apples"), (f"<|video_pad|>\n{P} {mme}\n", "A. Apples."))
    assert prompts(root, "Video-MME", "vlm2vec")[1] == ["Apples", "Candles", "Berries",
                                                        "The three kinds are of the same number"]
    nextqa = ("what did the baby do after throwing the green cup away while on the floor near the end\nOptions:\n"
              "(A) clap proudly\n(B) the lady sitting down\n(C) lay on floor\n(D) just picked it up\n(E) crawl")
    check(root, "NExTQA", 0, (f"<|video_pad|> {P} {nextqa}", "clap proudly"),
          (f"<|video_pad|>\n{P} {nextqa}\n", "clap proudly"))
    ego = ("Taking into account all the actions performed by c, what can you deduce about the primary objective and "
           "focus within the video content?A. C is cooking. B. C is doing laundry. C. C is cleaning the kitchen. "
           "D. C is cleaning dishes. E. C is cleaning the bathroom.")
    check(root, "EgoSchema", 0, (f"<|video_pad|> {P} {ego}", "C is cooking"),
          (f"<|video_pad|>\n{P} {ego}\n", "A. C is cooking."))
    mvb = ("Why did Castle dress like a fairy when he was speaking to Emily?\nOptions:\n(A) To get her to trust him\n"
           "(B) He secretly loved fairies\n(C) He lost a bet with Emily\n(D) It was dress like a fairy day at school\n"
           "(E) Mrs Ruiz made him dress up")
    check(root, "MVBench", 0, (f"<|video_pad|> {P} {mvb}", "(A) To get her to trust him"),
          (f"<|video_pad|>\n{P} {mvb}\n", "(A) To get her to trust him"))
    anet = "does the girl in black clothes have long hair? (A) yes; (B) no."
    check(root, "ActivityNetQA", 0, (f"<|video_pad|> {P} {anet}", "yes"), (f"<|video_pad|>\n{P} {anet}\n", "yes"))
    assert prompts(root, "ActivityNetQA", "btoks")[1] == ["yes", "no"]

    # The authors' whitespace cases: kept by VLM2Vec, normalised in the canonical form.
    amy = ("What was Amy and Rachel doing before Ross came in the room.{}\nOptions:\n(A) Amy and Rachel where cooking "
           "before Ross came in the room.\n(B) Amy and Rachel where fighting when Ross came in the room.\n(C) Amy and "
           "Rachel Where getting dressed when Ross came in the room.\n(D) Amy and Rachel was talking before Ross came "
           "in the room.\n(E) Amy and Rachel was cleaning before Ross came in the room.")
    assert prompts(root, "MVBench", "vlm2vec", 1)[0] == f"<|video_pad|> {P} " + amy.format(" ")
    assert prompts(root, "MVBench", "btoks", 1)[0] == wrapped(f"<|video_pad|>\n{P} " + amy.format("") + "\n")
    camera = ("why does the man in red turn the camera to himself in the middle of the video\nOptions:\n"
              "(A) look at phone\n(B) to talk to it\n(C) to check his face\n(D) to fix the camera{}\n"
              "(E) blow dust off lenses")
    assert prompts(root, "NExTQA", "vlm2vec", 1)[0] == f"<|video_pad|> {P} " + camera.format(" ")
    assert prompts(root, "NExTQA", "btoks", 1)[0] == wrapped(f"<|video_pad|>\n{P} " + camera.format("") + "\n")
    assert prompts(root, "NExTQA", "vlm2vec", 1)[1][3] == "to fix the camera "
    assert prompts(root, "NExTQA", "btoks", 1)[1][3] == "to fix the camera"
    assert prompts(root, "ActivityNetQA", "vlm2vec", 1)[0] == (
        f"<|video_pad|> {P} does this sport need leg strength ? (A) yes; (B) no.")
    assert prompts(root, "ActivityNetQA", "btoks", 1)[0] == wrapped(
        f"<|video_pad|>\n{P} does this sport need leg strength? (A) yes; (B) no.\n")
    assert prompts(root, "MVBench", "vlm2vec", 2)[1][0] == "(A) She is jealous about Bernadette's looks. "
    assert prompts(root, "MVBench", "btoks", 2)[1][0] == "(A) She is jealous about Bernadette's looks."
    # Video-MME's question ends in a space; EgoSchema's trailing space is its only separator before the options.
    assert prompts(root, "Video-MME", "vlm2vec", 1)[0].endswith("appears first? \nA. Black.\nB. White.\nC. Orange.\n"
                                                                 "D. Grey.")
    assert prompts(root, "Video-MME", "btoks", 1)[0].endswith("appears first?\nA. Black.\nB. White.\nC. Orange.\n"
                                                              "D. Grey.\n")
    assert prompts(root, "EgoSchema", "vlm2vec", 1)[0].endswith("in the video? A. C is painting. B. C is gardening. "
                                                                 "C. C is knitting. D. C is reading. E. C is sleeping.")
    assert prompts(root, "EgoSchema", "btoks", 1)[0].endswith("in the video?A. C is painting. B. C is gardening. "
                                                              "C. C is knitting. D. C is reading. E. C is sleeping.\n")


def test_moment_retrieval_prompts(published):
    root, _ = published
    scene = "Find the clip that corresponds to the described scene in the given video:"
    target_v = "<|video_pad|> Understand the content of the provided video."
    target_b = "<|video_pad|>\nUnderstand the content of the provided video.\n"
    for name, query in (("QVHighlight", "A girl and her mother cooked while talking with each other on facetime."),
                        ("Charades-STA", "person turn a light on.")):
        check(root, name, 0, (f"<|video_pad|> {scene} {query}", target_v),
              (f"<|video_pad|>\n{scene} {query}\n", target_b))
    assert prompts(root, "QVHighlight", "vlm2vec", 1)[0].endswith("before doing his interview. ")
    assert prompts(root, "QVHighlight", "btoks", 1)[0].endswith("before doing his interview.\n")

    clip_v = "<|video_pad|> Understand the content of the provided video clip."
    clip_b = "<|video_pad|>\nUnderstand the content of the provided video clip.\n"
    video = ("Find the clip that corresponds to the given sentence and video segment: "
             "What happened to this window afterward?")
    image = ("Select the video clip that aligns with the given text and image: "
             "Did the man and the woman in the picture embrace?")
    text = "Find the clip that corresponds to the given text: What game did I play after playing Connect 4?"
    check(root, "MomentSeeker", 0, (f"<|video_pad|> {video}", clip_v), (f"<|video_pad|>\n{video}\n", clip_b))
    check(root, "MomentSeeker", 1, (f"<|image_pad|> {image}", clip_v), (f"<|image_pad|>\n{image}\n", clip_b))
    check(root, "MomentSeeker", 2, (text, clip_v), (f"{text}\n", clip_b))
    rows = load(root, "MomentSeeker", "vlm2vec").rows
    assert rows[0].query.video and rows[0].query.image is None
    assert rows[1].query.image.endswith("query_images/ego/frame_0123.jpg") and rows[1].query.video is None
    assert rows[2].query.image is None and rows[2].query.video is None


# ===================================== rows, candidates, frames =====================================


def _number(name: str) -> int:
    return int(re.sub(r"\D", "", name))


def check_frames(frames: tuple[str, ...]) -> int:
    """The picked frames are the folder's images at linspace(0, n-1, 8) (all when n < 8); returns n."""
    folder = Path(frames[0]).parent
    names = sorted((p.name for p in folder.iterdir() if p.suffix in (".jpg", ".jpeg", ".png")), key=_number)
    picks = np.linspace(0, len(names) - 1, 8).astype(int) if len(names) >= 8 else range(len(names))
    assert frames == tuple(str(folder / names[i]) for i in picks)
    return len(names)


@pytest.mark.parametrize("name", VIDEO_NAMES)
def test_rows_candidates_relevance_frames(published, name):
    root, counts = published
    tasks = {style: load(root, name, style) for style in STYLES}
    for task in tasks.values():
        assert task.name == name and task.ranking == MMEB_V2_BY_NAME[name].ranking
        assert len(task.rows) == counts[name]
        for row in task.rows:
            assert len(row.candidates) == len(row.relevance) >= 1
            assert set(row.relevance) <= {0.0, 1.0} and 1.0 in row.relevance
            if task.ranking == "global":
                assert row.relevance == (1.0,) and row.candidates[0] in task.corpus
            else:
                assert task.corpus == () and len(row.candidates) > 1
            for item in (row.query, *row.candidates):
                assert item.instruction == ""
                if item.video:
                    assert 1 <= len(item.video) <= 8 and check_frames(item.video) >= 4
    shape = [[(len(r.candidates), sum(r.relevance), bool(r.query.video)) for r in t.rows] for t in tasks.values()]
    assert shape[0] == shape[1]  # the styles differ in text only


def test_grades_and_pools(published):
    root, _ = published
    for name in ("K700", "UCF101", "HMDB51", "Breakfast"):
        task = load(root, name, "btoks")
        assert task.corpus == tuple(Item(text=label) for label in class_labels()[name])
    for name in ("DiDeMo", "MSR-VTT", "MSVD", "VATEX", "YouCook2"):
        task = load(root, name, "vlm2vec")
        assert task.corpus == tuple(dict.fromkeys(row.candidates[0] for row in task.rows))
        assert all(item.video for item in task.corpus)
    grades = {name: [row.relevance for row in load(root, name, "vlm2vec").rows]
              for name in ("Video-MME", "NExTQA", "EgoSchema", "MVBench", "ActivityNetQA", "QVHighlight",
                           "Charades-STA", "MomentSeeker")}
    assert grades["Video-MME"] == [(0.0, 0.0, 1.0, 0.0)] * 2
    assert grades["NExTQA"] == [(1.0, 0.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0, 0.0)]
    assert grades["EgoSchema"] == [(0.0, 0.0, 0.0, 1.0, 0.0), (0.0, 1.0, 0.0, 0.0, 0.0)]
    assert grades["MVBench"] == [(1.0, 0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0, 0.0), (1.0, 0.0, 0.0)]
    assert grades["ActivityNetQA"] == [(1.0, 0.0), (1.0, 0.0), (0.0, 1.0)]
    # Clip folders in natural order (negative_clip_0, ..., positive_clip); `query/` is the query, not a candidate.
    assert grades["QVHighlight"] == [(0.0, 0.0, 1.0), (0.0, 0.0, 0.0, 1.0)]
    assert grades["Charades-STA"] == grades["QVHighlight"]
    assert grades["MomentSeeker"] == [(1.0, 0.0, 0.0, 0.0)] * 2 + [(1.0, 1.0, 0.0, 0.0)]
    qv = load(root, "QVHighlight", "vlm2vec").rows[0]
    assert Path(qv.query.video[0]).parent.name == "query"
    assert [Path(c.video[0]).parent.name for c in qv.candidates] == ["negative_clip_0", "negative_clip_1",
                                                                     "positive_clip"]
    seeker = load(root, "MomentSeeker", "vlm2vec").rows[0]
    assert Path(seeker.candidates[0].video[0]).parent.name == "clips_movie101_77_0_8"


def test_frame_picking(published):
    root, _ = published
    first = load(root, "K700", "vlm2vec").rows[0].query.video  # frame_1.jpg ... frame_12.jpg, unpadded
    assert [Path(f).name for f in first] == [f"frame_{i}.jpg" for i in (1, 2, 4, 5, 7, 8, 10, 12)]
    short = load(root, "HMDB51", "vlm2vec").rows[2].query.video  # a 4-frame video: all of them
    assert [Path(f).name for f in short] == [f"frame_{i:04d}.jpg" for i in (1, 2, 3, 4)]
    qa = load(root, "NExTQA", "btoks").rows[0].query.video
    assert len(qa) == 8 and all(f.endswith(".jpeg") for f in qa)


def test_smthsmthv2_reads_its_first_1000_rows(fresh):
    path = fresh / "VLM2Vec/SmthSmthV2/data/test-00000-of-00001.parquet"
    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table] * 335), path)  # 1005 rows over the same three videos
    for style in STYLES:
        assert len(load(fresh, "SmthSmthV2", style).rows) == 1000


# ===================================== folders, missing data, errors =====================================


def test_folder_names_of_both_sides(fresh):
    frames = fresh / FRAMES
    moves = {"video_cls/K700": "K700", "video_qa/EgoSchema": "video_qa/egoschema",
             "video_mret/Charades_STA": "video_mret/Charades-STA",
             "video_ret/MSVD": "data/ziyan/video_retrieval/MSVD/frames"}
    for old, new in moves.items():
        (frames / new).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(frames / old, frames / new)
    for name, new in (("K700", "K700"), ("EgoSchema", "video_qa/egoschema"),
                      ("Charades-STA", "video_mret/Charades-STA"), ("MSVD", "data/ziyan/video_retrieval/MSVD/frames")):
        row = load(fresh, name, "btoks").rows[0]
        video = row.query.video or row.candidates[0].video
        assert video[0].startswith(f"{frames / new}/")
    shutil.copytree(frames / "K700", frames / "video_cls/K700")  # both present: VLM2Vec's folder wins
    assert load(fresh, "K700", "vlm2vec").rows[0].query.video[0].startswith(f"{frames / 'video_cls/K700'}/")


def test_missing_sets_raise_missing_data(tmp_path, published):
    root, _ = published
    for name in VIDEO_NAMES:
        with pytest.raises(MissingData, match="not downloaded"):
            load(tmp_path, name, "vlm2vec")
    annotations_only = tmp_path / "annotations"
    for owner in ("VLM2Vec", "lmms-lab"):
        shutil.copytree(root / owner, annotations_only / owner)
    for name in VIDEO_NAMES:
        with pytest.raises(MissingData, match="frames not extracted"):
            load(annotations_only, name, "btoks")
    shutil.rmtree(annotations_only / "VLM2Vec/MVBench/moving_count")  # one of MVBench's 20 configs
    with pytest.raises(MissingData, match="moving_count"):
        load(annotations_only, "MVBench", "vlm2vec")


def test_video_without_frames_names_file_row_field_and_folder(fresh):
    frames = fresh / FRAMES
    cases = [  # (set, folder emptied, parquet, row, field)
        ("HMDB51", "video_cls/HMDB51/dive_off_cliff_f_cm_np1_ri_bad_2", "VLM2Vec/HMDB51/data/test", 3, "video_id"),
        ("NExTQA", "video_qa/NExTQA/6233408665", "VLM2Vec/NExTQA/MC/test", 2, "video"),
        ("MSR-VTT", "video_ret/MSR-VTT/video7021", "VLM2Vec/MSR-VTT/test_1k/test", 2, "video_id"),
        ("QVHighlight", "video_mret/QVHighlight/RoripwjYFp8_60.0_210.0/negative_clip_1",
         "VLM2Vec/QVHighlight/data/test", 2, "video_path"),
        ("MomentSeeker", "video_mret/MomentSeeker/video_frames/clips_ego_ego_40_20_28",
         "VLM2Vec/MomentSeeker/data/test", 3, "negative_frames"),
    ]
    for name, folder, parquet, row, field_name in cases:
        for frame in (frames / folder).iterdir():
            frame.unlink()
        for style in STYLES:
            with pytest.raises(ValueError) as err:
                load(fresh, name, style)
            message = str(err.value)
            assert f"{fresh / parquet}-00000-of-00001.parquet: row {row}: field '{field_name}'" in message
            assert str(frames / folder) in message and "does not decode videos" in message
    shutil.rmtree(frames / "video_qa/ActivityNetQA/v_Lz6BwzUZ6AI")  # an absent folder reads the same
    with pytest.raises(ValueError, match=r"test-00000-of-00001.parquet: row 2: field 'video_name': no frame images"):
        load(fresh, "ActivityNetQA", "vlm2vec")


def _retype(path: Path, column: str, values: list, kind: pa.DataType) -> None:
    table = pq.read_table(path)
    index = table.schema.get_field_index(column)
    pq.write_table(table.set_column(index, column, pa.array(values, kind)), path)


def test_wrongly_typed_fields_name_file_row_and_field(fresh):
    nextqa = fresh / "VLM2Vec/NExTQA/MC/test-00000-of-00001.parquet"
    _retype(nextqa, "answer", ["0", "1"], pa.string())
    with pytest.raises(ValueError, match=rf"{re.escape(str(nextqa))}: row 1: field 'answer': expected int, got str"):
        load(fresh, "NExTQA", "vlm2vec")
    msvd = fresh / "VLM2Vec/MSVD/data/test-00000-of-00001.parquet"
    _retype(msvd, "caption", ["two young men", "a woman"], pa.string())
    with pytest.raises(ValueError, match=rf"{re.escape(str(msvd))}: row 1: field 'caption': expected list, got str"):
        load(fresh, "MSVD", "btoks")
    ego = fresh / "VLM2Vec/EgoSchema/Subset/test-00000-of-00001.parquet"
    _retype(ego, "answer", ["3", "seven"], pa.string())
    with pytest.raises(ValueError, match=r"row 2: field 'answer': expected an option index, got 'seven'"):
        load(fresh, "EgoSchema", "btoks")
    mvbench = fresh / "VLM2Vec/MVBench/episodic_reasoning/train-00000-of-00001.parquet"
    _retype(mvbench, "answer", ["To trust him"], pa.string())
    with pytest.raises(ValueError, match=r"row 1: field 'answer': 'To trust him' is not among the candidates"):
        load(fresh, "MVBench", "vlm2vec")
    with pytest.raises(ValueError, match="prompt style"):
        load(fresh, "K700", "phi3")
