"""Writes the miniature MMEB fixtures: every family's published layout, tiny, deterministic.

    python tests/make_mmeb_fixtures.py OUT [--families train,image,video,visdoc]

`OUT/train/` is a training download root (`btoks data prepare --root OUT/train`), `OUT/eval/` an MMEB-V2 download
root with all 78 sets (`btoks eval --mmeb-v2 OUT/eval`). Each family's writer is in `tests/mmeb_fixtures/`; nothing
in the fixtures is edited by hand. Prints the row counts written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmeb_fixtures import image, train, video, visdoc  # noqa: E402

FAMILIES = {"train": ("train", train.write), "image": ("eval", image.write), "video": ("eval", video.write),
            "visdoc": ("eval", visdoc.write)}


def write_all(out: str | Path, families=tuple(FAMILIES)) -> dict[str, dict[str, int]]:
    """{family: {data set: rows}} after writing each family under `out/train` or `out/eval`."""
    out = Path(out)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown fixture families {unknown}; choose from {sorted(FAMILIES)}")
    counts = {}
    for family in families:
        folder, write = FAMILIES[family]
        counts[family] = write(out / folder)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--families", default=",".join(FAMILIES))
    args = p.parse_args(argv)
    print(json.dumps(write_all(args.out, [f for f in args.families.split(",") if f]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
