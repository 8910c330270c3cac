"""The condensation mask of BToks as a static block-sparse description.

A training sequence has the static layout `[Q | B | T]`: the query side left-padded to `query_len`
(so its last real token sits right before the BToks), the K bottleneck tokens, and the target
right-padded to `target_len`. Who may attend to whom is then a property of the three regions
alone, a 3x3 table, and the dense boolean mask, the splash-kernel mask and the fraction of
skippable kernel blocks are all derived from it. Padding is handled separately by segment ids.

  from \\ to |  Q      B       T
  Q         | causal  no      no
  B         | all     causal  no
  T         | cut     all     causal        ("condensation"; "full" lets T see Q)

With K = 0 the condensation mask lets T see the last Q column only: the last input token is then the
bottleneck (the "no BToks" ablation trained with GIC).
"""

from __future__ import annotations

import dataclasses

import numpy as np

Q, B, T = 0, 1, 2

# allowed[from_region][to_region], combined with causality.
MODES: dict[str, np.ndarray] = {
    # The method: the target reaches the query only through the BToks.
    "condensation": np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]], bool),
    # The "no mask" ablation (generation_kv_mode=full): a plain causal mask.
    "full": np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], bool),
    # Diagnostic: BToks blind to the query too, so the target gets no information from it at all.
    "isolated": np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1]], bool),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static region lengths of a `[Q | B | T]` sequence (hashable: safe as a jit static argument)."""

    query_len: int
    num_btoks: int
    target_len: int = 0

    @property
    def length(self) -> int:
        return self.query_len + self.num_btoks + self.target_len

    @property
    def btok_slice(self) -> slice:
        return slice(self.query_len, self.query_len + self.num_btoks)

    @property
    def target_slice(self) -> slice:
        return slice(self.query_len + self.num_btoks, self.length)

    def regions(self) -> np.ndarray:
        """int[L]: the region (Q, B or T) of every column."""
        return np.repeat(np.array([Q, B, T]), [self.query_len, self.num_btoks, self.target_len])


def static_mask(layout: Layout, mode: str = "condensation") -> np.ndarray:
    """bool[L, L], causality included: row attends to column."""
    if mode not in MODES:
        raise ValueError(f"unknown mask mode {mode!r}; choose one of {sorted(MODES)}")
    regions = layout.regions()
    allowed = MODES[mode][regions[:, None], regions[None, :]]
    if layout.num_btoks == 0 and mode == "condensation" and layout.query_len and layout.target_len:
        # No BToks (the "no BToks" ablation with GIC): the last input token is a one-token bottleneck, as the
        # authors' two-pass code keeps the last cache entry when K = 0. Left alignment puts it in column Q - 1.
        allowed[layout.target_slice, layout.query_len - 1] = True
    return allowed & np.tri(layout.length, dtype=bool)


def block_skip_fraction(layout: Layout, mode: str = "condensation", block_q: int = 512, block_kv: int = 512) -> float:
    """Fraction of (block_q x block_kv) tiles with nothing to attend, which the splash kernel skips.

    The sequence is padded up to whole blocks as the kernel does; a plain causal mask of the same
    length is the baseline to compare against.
    """
    mask = static_mask(layout, mode)
    lq, lk = -(-mask.shape[0] // block_q) * block_q, -(-mask.shape[1] // block_kv) * block_kv
    padded = np.zeros((lq, lk), bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    tiles = padded.reshape(lq // block_q, block_q, lk // block_kv, block_kv).any(axis=(1, 3))
    return float(1.0 - tiles.mean())
