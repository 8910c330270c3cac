"""Readers of the 78 MMEB-V2 data sets in their published layouts (see `common.py` for the folder layout).

`loaders()` maps every MMEB-V2 name to `load(root, style, media_dir) -> Task`: image sets from
`image.py`, video sets from `video.py`, visual-document sets from `visdoc.py`.
"""

from __future__ import annotations

from btoks_jax.evaluate.published.common import STYLES, MissingData, Task

__all__ = ["STYLES", "MissingData", "Task", "loaders"]


def loaders() -> dict:
    """{MMEB-V2 name: loader} for all 78 sets, in the reporter's order."""
    from btoks_jax.evaluate.mmeb import MMEB_V2_DATASETS
    from btoks_jax.evaluate.published import image, video, visdoc

    merged = {**image.TASKS, **video.TASKS, **visdoc.TASKS}
    names = [spec.name for spec in MMEB_V2_DATASETS]
    unknown = sorted(set(merged) - set(names))
    missing = [name for name in names if name not in merged]
    if unknown or missing:
        raise RuntimeError(f"MMEB-V2 readers out of step with the data set map: unknown {unknown}, missing {missing}")
    return {name: merged[name] for name in names}
