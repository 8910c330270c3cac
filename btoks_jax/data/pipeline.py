"""Training batches: a deterministic, resumable grain pipeline from MMEB-format data sets to packed pairs."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from btoks_jax.data.mmeb_train import DatasetSpec, TrainRow, generation_text, load_media, read_mmeb_train
from btoks_jax.inputs import PackedBatch, encode_target, pack
from btoks_jax.model_config import ENDOFTEXT_ID, VISION_END_ID, VISION_START_ID, Qwen2VLConfig
from btoks_jax.processing import MODEL_PROMPT_STYLES, ImageProcessor, Processor, VideoProcessor

SIDES = ("query", "positive")
_PIXELS = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))
BAD_ROW_MODES = ("fail", "skip")
# on_bad_row "skip": the skipped share is checked against max_skip_fraction once this many rows were read, so that
# one bad row among the first few does not stop a run.
MIN_ROWS_BEFORE_SKIP_LIMIT = 100
# on_bad_row "skip": how many rows in a row of one data set's sample order may be bad before the data set is
# taken for broken (an error) rather than searched on.
MAX_REPLACEMENTS = 64

log = logging.getLogger("btoks.data")


class BadRowsError(ValueError):
    """More rows could not be used than `PipelineConfig.max_skip_fraction` allows (on_bad_row "skip")."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Static shapes and preprocessing of the training batches (defaults: the headline recipe, PAPER.md 6).

    buckets: (query_len, patch_budget) pairs, both ascending. Each side of a step's global batch takes the
      first bucket that holds its longest input and its largest patch count; a side without any image or
      video in the whole batch gets patch budget 0. A patch budget is patches per sample (4 per vision
      token), so a bucket sized for one max_pixels image needs 4 * 1280 = 5120. Video sets need larger
      buckets (8 frames at 28*28*768 pixels are 3072 tokens).
    Over-long inputs: a side longer than the largest query_len loses text tokens from its end; vision tokens
      are never cut (a partial image cannot be encoded), so a side whose vision tokens alone exceed the largest
      bucket, or whose patches exceed the largest patch budget, raises ValueError naming the row.
    target_len: the longest target region (wrapper tokens included); 0: no target region (no generative
      loss). target_buckets: ascending target-region lengths, the last equal to target_len (default: just
      target_len); each side of a step takes the first that holds its longest target, so short targets (class
      names) do not pay for long ones (captions). Targets are not truncated (as the authors' code): a longer one
      raises ValueError naming the row, unless truncate_targets cuts it to target_len (`<|im_end|>` kept).
    rope_convention: "legacy" reproduces transformers 4.x `get_rope_index`, which both reference
      implementations ran (VLM2Vec-style bare pads then get 1-D positions); see `btoks_jax.rope_index`.
    on_bad_row: what a row that cannot be used does, i.e. one whose processing in the read threads raises
      ValueError (an image or frame that cannot be decoded, vision tokens over the largest bucket, a target over
      the budget; the messages name the file, the row and the field). "fail" (the default: the authors' code
      crashes on such a row) stops with that error. "skip" logs it, counts it and uses the next row of the same
      data set in that data set's sample order instead (the row its next sub-batch would read, a pure function of
      the seed and the position, so a resumed run reads the same batches); without bad rows both modes give the
      same batches, bit for bit. Rows that fail when a data set is opened (a missing field, a missing file) are
      the readers' errors, raised before training starts.
    max_skip_fraction: with "skip", the run stops (`BadRowsError`) once more than this share of the rows read so
      far was skipped, counted from MIN_ROWS_BEFORE_SKIP_LIMIT rows on. Each process checks its own rows
      (a resumed run's counts shared out evenly); checkpoints and metrics hold the counts of all processes.
    """

    global_batch_size: int = 1024
    subbatch_size: int = 512  # consecutive samples drawn from one data set
    num_btoks: int = 4
    buckets: tuple[tuple[int, int], ...] = ((128, 512), (256, 1024), (512, 2048), (1024, 4096), (1536, 5120))
    target_len: int = 128  # 0: no target region (no generative loss)
    target_buckets: tuple[int, ...] | None = None
    truncate_targets: bool = False
    prompt_style: str = "btoks"
    rope_convention: str = "legacy"
    image_min_pixels: int = 28 * 28 * 4
    image_max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 28 * 28 * 4
    video_max_pixels: int = 28 * 28 * 768
    video_num_frames: int | None = 8  # frames sampled uniformly from each video (None: all)
    video_frame_sampling: str = "linspace"  # the authors' linspace(0, n - 1, 8); "hf": HF's sample_frames
    seed: int = 0
    num_threads: int = 16  # grain read threads (tokenisation and image decoding run there)
    prefetch_batches: int = 2  # local batches processed ahead
    on_bad_row: str = "fail"  # "fail" (the authors' behaviour: a bad row stops the run) or "skip"
    max_skip_fraction: float = 0.01  # "skip": the most rows skipped per row read before the run stops

    def __post_init__(self):
        # Configs may hand lists (ml_collections); tuples keep the dataclass hashable.
        object.__setattr__(self, "buckets", tuple((int(n), int(p)) for n, p in self.buckets))
        if self.global_batch_size % self.subbatch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of subbatch_size "
                             f"{self.subbatch_size}")
        if not self.buckets:
            raise ValueError("at least one (query_len, patch_budget) bucket is needed")
        lengths, budgets = zip(*self.buckets, strict=True)
        if list(lengths) != sorted(set(lengths)) or list(budgets) != sorted(budgets):
            raise ValueError(f"buckets must ascend: query_len strictly, patch_budget weakly; got {self.buckets}")
        if self.prompt_style not in MODEL_PROMPT_STYLES:
            styles = " or ".join(repr(style) for style in MODEL_PROMPT_STYLES)
            raise ValueError(f"prompt_style must be {styles}, got {self.prompt_style!r}")
        if self.target_len < 0 or self.num_btoks < 0 or self.seed < 0:
            raise ValueError("target_len, num_btoks and seed must be >= 0")
        targets = tuple(int(n) for n in (self.target_buckets or (self.target_len,)))
        object.__setattr__(self, "target_buckets", targets)
        if self.target_len and (list(targets) != sorted(set(targets)) or targets[-1] != self.target_len
                                or targets[0] < 1):
            raise ValueError(f"target_buckets must ascend strictly and end at target_len {self.target_len}, "
                             f"got {targets}")
        if self.on_bad_row not in BAD_ROW_MODES:
            raise ValueError(f"on_bad_row must be 'fail' or 'skip', got {self.on_bad_row!r}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")


def check_budgets(config: PipelineConfig, model_config: Qwen2VLConfig) -> None:
    """Raises ValueError when a bucket with a patch budget cannot hold one image at `image_min_pixels` (its vision
    tokens plus the `<|vision_start|>` / `<|vision_end|>` wrapper, and its patches): such a bucket would never
    take an image, and when it is the largest, every image row fails. Checked before anything compiles."""
    vision = model_config.vision_config
    cell = (vision.patch_size * vision.spatial_merge_size) ** 2  # pixels of one merged vision token
    tokens = max(1, math.ceil(config.image_min_pixels / cell))
    patches = tokens * vision.spatial_merge_size ** 2
    for query_len, budget in config.buckets:
        if budget and (tokens + 2 > query_len or patches > budget):
            raise ValueError(
                f"data.buckets: bucket ({query_len}, {budget}) cannot hold one image at data.image_min_pixels="
                f"{config.image_min_pixels}: that is at least {tokens} vision tokens + 2 wrapper tokens (query_len "
                f"{query_len}) and {patches} patches (patch budget {budget}); enlarge the bucket, give it patch "
                f"budget 0 (text only) or lower image_min_pixels")


@dataclasses.dataclass
class TrainBatch:
    """One step's batch (this process's rows): both sides packed as `[Q | B | T]`, NumPy arrays.

    query.labels / label_mask score the positive's text where the data set generates it (ntp_side positive
    or both), positive.labels / label_mask the query's text (ntp_side query or both).
    """

    query: PackedBatch
    positive: PackedBatch
    dataset_ids: np.ndarray  # int32[B] index into the iterator's data sets
    row_ids: np.ndarray  # int64[B] row within that data set (a skipped bad row's replacement, see on_bad_row)
    step: int
    skipped: tuple[str, ...] = ()  # the errors of the bad rows that were replaced in this batch (on_bad_row "skip")


class MixtureSchedule:
    """Which data set and row fill position k of step s's global batch: a pure function of the seed.

    Sub-batch u = s * (G / S) + k // S comes from data set d(u), drawn with probability proportional to the
    weights by a generator seeded with (seed, u // BLOCK), as the reference sampler draws one data set per
    `interleave_batch_size` block. A data set is read in epochs: its n-th sample overall is row
    perm_e(n mod len) of epoch e = n // len, perm_e a fresh permutation seeded by (seed, data set, e), as the
    reference reshuffles a data set when it runs out. n depends on how many earlier
    sub-batches drew the same data set; those counts are kept per block, so a lookup costs O(BLOCK) at most.
    """

    BLOCK = 4096

    def __init__(self, lengths: Sequence[int], weights: Sequence[float], global_batch_size: int,
                 subbatch_size: int, seed: int):
        if not lengths or min(lengths) < 1:
            raise ValueError(f"every data set needs at least one row, got lengths {list(lengths)}")
        self.lengths = [int(n) for n in lengths]
        self.probs = np.asarray(weights, np.float64) / np.sum(weights)
        self.subbatches_per_step = global_batch_size // subbatch_size
        self.subbatch_size = subbatch_size
        self.seed = seed
        self._choices = np.zeros(0, np.int32)
        self._counts_before_block = np.zeros((1, len(lengths)), np.int64)
        self._lock = threading.Lock()  # grain's read threads extend the tables concurrently
        # Two epochs per data set: reads in flight straddle at most one epoch boundary.
        self._permutation = functools.lru_cache(maxsize=2 * len(lengths))(self._make_permutation)

    def _ensure(self, block: int) -> None:
        with self._lock:
            while len(self._counts_before_block) <= block + 1:
                b = len(self._counts_before_block) - 1
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0, b]))
                new = rng.choice(len(self.lengths), size=self.BLOCK, p=self.probs).astype(np.int32)
                counts = self._counts_before_block[-1] + np.bincount(new, minlength=len(self.lengths))
                self._choices = np.concatenate([self._choices, new])
                self._counts_before_block = np.concatenate([self._counts_before_block, counts[None]])

    def subbatch(self, u: int) -> tuple[int, int]:
        """(data set of sub-batch u, how many earlier sub-batches drew it)."""
        block = u // self.BLOCK
        self._ensure(block)
        choices, counts = self._choices, self._counts_before_block
        dataset = int(choices[u])
        return dataset, int(counts[block, dataset] + np.count_nonzero(choices[block * self.BLOCK:u] == dataset))

    def locate(self, step: int, position: int, offset: int = 0) -> tuple[int, int]:
        """(data set, row) of global-batch position `position` at `step`; with `offset` k > 0, the row k places
        after it in its data set's sample order (what replaces a bad row)."""
        u = step * self.subbatches_per_step + position // self.subbatch_size
        dataset, earlier = self.subbatch(u)
        length = self.lengths[dataset]
        epoch, index = divmod(earlier * self.subbatch_size + position % self.subbatch_size + offset, length)
        return dataset, int(self._permutation(dataset, epoch)[index])

    def _make_permutation(self, dataset: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1, dataset, epoch]))
        return rng.permutation(self.lengths[dataset]).astype(np.int32)


def open_rows(spec: DatasetSpec, prompt_style: str, check_files: bool = True) -> Sequence[TrainRow]:
    """Random access to a data set's rows: a list for JSONL / parquet, a grain MapDataset over ArrayRecord; local
    paths or `gs://` URLs."""
    if spec.format == "tfds":
        from btoks_jax.data.tfds_mmeb import read_tfds  # tensorflow-datasets is imported only when used

        return read_tfds(spec.path, spec.name, prompt_style=prompt_style)
    return read_mmeb_train(spec.path, spec.image_root, prompt_style=prompt_style, check_files=check_files,
                           media_roots=spec.media_roots)


@dataclasses.dataclass
class _Sample:
    """One row processed for both sides (token arrays 1-D, vision arrays as the processor returns them)."""

    dataset: int
    row: int
    sides: dict[str, dict[str, np.ndarray]]
    targets: dict[str, tuple[list[int], int] | None]
    skipped: tuple[str, ...] = ()  # errors of the bad rows this sample replaces


class _SampleLoader:
    """Local sample index -> `_Sample`; runs in grain's read threads."""

    def __init__(self, specs, sources, schedule: MixtureSchedule, processor: Processor, config: PipelineConfig,
                 process_index: int, local_batch: int):
        self.specs, self.sources, self.schedule, self.config = specs, sources, schedule, config
        self.process_index, self.local_batch = process_index, local_batch
        self.max_len, self.max_patches = config.buckets[-1]
        # A fast tokenizer raises "Already borrowed" when one thread changes its padding / truncation state
        # while another encodes. The loader's tokenizer is a private copy, and every call below uses the same
        # settings (no padding, no truncation); set once here, before the read threads start, they never change.
        self.processor = processor
        processor(["warm-up"], padding=False)
        encode_target(processor.tokenizer, "warm-up")

    def __call__(self, index: int) -> _Sample:
        step, slot = divmod(index, self.local_batch)
        position = self.process_index * self.local_batch + slot
        dataset, row_id = self.schedule.locate(step, position)
        if self.config.on_bad_row == "fail":
            return self._sample(dataset, row_id)
        skipped = []
        for offset in range(1, MAX_REPLACEMENTS + 1):
            try:
                sample = self._sample(dataset, row_id)
            except ValueError as err:  # the readers' and the checks' errors name the file, row and field
                skipped.append(str(err))
                _, replacement = self.schedule.locate(step, position, offset)
                log.warning("skipping a bad row (data.on_bad_row='skip'), step %d: %s; data set %r row %d "
                            "replaces it", step, err, self.specs[dataset].name, replacement)
                row_id = replacement
                continue
            return dataclasses.replace(sample, skipped=tuple(skipped))
        raise BadRowsError(f"data set {self.specs[dataset].name!r}: {MAX_REPLACEMENTS} rows in a row of its sample "
                           f"order cannot be used (step {step}); the last: {skipped[-1]}")

    def _sample(self, dataset: int, row_id: int) -> _Sample:
        row = self.sources[dataset][row_id]
        processor = self.processor
        ntp = self.specs[dataset].ntp_side
        sides, targets = {}, {}
        for side, other, generates in (("query", "positive", ntp in ("positive", "both")),
                                       ("positive", "query", ntp in ("query", "both"))):
            sides[side] = self._encode(processor, row, side)
            # Only text is generated: the other side's vision placeholders are dropped from its target, and a
            # side with no text left has nothing to generate.
            text = generation_text(getattr(row, other).text) if generates and self.config.target_len else ""
            text = text if text.strip() else ""
            targets[side] = self._target(processor, text, row, side) if text else None
        return _Sample(dataset, row_id, sides, targets)

    def _target(self, processor: Processor, text: str, row: TrainRow, side: str) -> tuple[list[int], int]:
        cfg = self.config
        ids, prefix = encode_target(processor.tokenizer, text, cfg.target_len if cfg.truncate_targets else None)
        if len(ids) > cfg.target_len:
            other = "positive" if side == "query" else "query"
            raise ValueError(f"{row.source}: the {other} text to generate is {len(ids)} tokens, over the target budget "
                             f"of {cfg.target_len} (data.target_len); raise it, or set data.truncate_targets")
        return ids, prefix

    def _encode(self, processor: Processor, row: TrainRow, side: str) -> dict[str, np.ndarray]:
        images, videos = load_media(row, side)
        try:
            out = processor([getattr(row, side).text], images=images, videos=videos, padding=False)
        except ValueError as err:  # e.g. a video with fewer frames than video_num_frames
            raise ValueError(f"{row.source}: {side} side: {err}") from err
        ids, types = out["input_ids"][0], out["mm_token_type_ids"][0]
        vision = (types != 0) | np.isin(ids, (VISION_START_ID, VISION_END_ID))
        if vision.sum() > self.max_len:
            raise ValueError(f"{row.source}: {side} side: {int(vision.sum())} vision tokens exceed the largest bucket "
                             f"({self.max_len} tokens); lower the max pixels or add a larger bucket")
        if len(ids) > self.max_len:  # cut text from the end, never a vision token
            text_positions = np.nonzero(~vision)[0]
            keep = np.ones(len(ids), bool)
            keep[text_positions[len(text_positions) - (len(ids) - self.max_len):]] = False
            ids, types = ids[keep], types[keep]
        encoded = {"input_ids": ids, "mm_token_type_ids": types}
        for pixels, grid in _PIXELS:
            if grid in out:
                encoded[pixels], encoded[grid] = out[pixels], out[grid]
        patches = _num_patches(encoded)
        if patches > self.max_patches:
            raise ValueError(f"{row.source}: {side} side: {patches} vision patches exceed the largest patch budget "
                             f"({self.max_patches}); lower the max pixels or add a larger bucket")
        return encoded


def _num_patches(encoded: dict[str, np.ndarray]) -> int:
    return sum(len(encoded[pixels]) for pixels, _ in _PIXELS if pixels in encoded)


def _collate(sides: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-sample processor outputs -> one right-padded processor-style batch (`inputs.pack` re-aligns it)."""
    width = max(len(s["input_ids"]) for s in sides)
    ids = np.full((len(sides), width), ENDOFTEXT_ID, np.int64)
    mask = np.zeros((len(sides), width), np.int64)
    types = np.zeros((len(sides), width), np.int64)
    for i, s in enumerate(sides):
        n = len(s["input_ids"])
        ids[i, :n], mask[i, :n], types[i, :n] = s["input_ids"], 1, s["mm_token_type_ids"]
    batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
    for pixels, grid in _PIXELS:
        having = [s for s in sides if grid in s]
        if having:
            batch[pixels] = np.concatenate([s[pixels] for s in having])
            batch[grid] = np.concatenate([s[grid] for s in having])
    return batch


def choose_bucket(buckets: Sequence[tuple[int, int]], tokens: int, patches: int) -> tuple[int, int]:
    """(query_len, patch_budget) of the first bucket holding `tokens` and `patches`; budget 0 without vision."""
    for query_len, budget in buckets:
        if tokens <= query_len and patches <= budget:
            return query_len, budget if patches else 0
    raise ValueError(f"no bucket holds {tokens} tokens and {patches} patches: {tuple(buckets)}")


def choose_target_bucket(buckets: Sequence[int], longest: int) -> int:
    """The first target-region length holding the longest target; 0 when no sample generates."""
    if not longest:
        return 0
    for length in buckets:
        if longest <= length:
            return length
    raise ValueError(f"no target bucket holds a {longest}-token target: {tuple(buckets)}")


def side_shapes(config: PipelineConfig) -> int:
    """How many distinct array shapes one side of a batch can take: per query bucket, its patch budget or none
    (a batch without vision), times each target region or none (a side that generates nothing)."""
    query = sum(2 if budget else 1 for _, budget in config.buckets)
    return query * (len(config.target_buckets) + 1 if config.target_len else 1)


def _allgather(values: np.ndarray) -> np.ndarray:
    """[processes, values.size]: `values` of every JAX process (every process must call it at the same step)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).reshape(-1, values.size)


def allgather_max(needs: np.ndarray) -> np.ndarray:
    """Element-wise max of `needs` over all JAX processes (every process must call it at the same step)."""
    return _allgather(needs).max(axis=0)


def allgather_sum(values: np.ndarray) -> np.ndarray:
    """Element-wise sum of `values` over all JAX processes (every process must call it at the same step)."""
    return _allgather(values).sum(axis=0)


class TrainBatchIterator:
    """Deterministic, resumable iterator of `TrainBatch`es over a weighted mixture of MMEB-format data sets.

    Batch `step` holds the global-batch positions [process_index * B, (process_index + 1) * B) with
    B = global_batch_size / process_count; a process opens and processes only those rows. Its rows, their
    order and every array are a function of (seed, step, data sets) alone, so the same seed gives the same
    batches on any number of threads, and the slices of all processes concatenate to the one-process batch.

    How it runs: grain maps every local sample index to a processed sample (`_SampleLoader`: row look-up,
    image decoding, tokenisation, targets) in `num_threads` read threads with `prefetch_batches` batches of
    look-ahead, and batches them; packing runs on the calling thread, because its static shapes (the
    bucket) need the longest side of the *global* batch: each process's needs go through `agree`
    (default: `allgather_max` when process_count > 1), so all processes pick the same bucket.

    Data in object storage (`gs://` paths in the specs): every process reads all rows' text and checks their media
    once when the iterator is built (the order is global, so any process may need any row; one listing per media
    folder), then reads only the images / frames of its own positions, each in the read thread that processes
    the sample, `prefetch_batches` batches ahead of the step (ArrayRecord records likewise, one by one).

    State: `get_state()` is a small JSON-able dict holding the next step; `set_state` restarts the grain
    iterator at that step, so the following batches equal an uninterrupted run's (also after a change of
    process_count, as positions are global).
    """

    def __init__(self, datasets: Sequence[DatasetSpec], config: PipelineConfig, model_config: Qwen2VLConfig,
                 tokenizer, *, process_index: int = 0, process_count: int = 1,
                 agree: Callable[[np.ndarray], np.ndarray] | None = None, check_files: bool = True):
        if config.global_batch_size % process_count:
            raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by process_count "
                             f"{process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
        group = model_config.vision_config.spatial_merge_size ** 2
        if any(budget % group for _, budget in config.buckets):
            raise ValueError(f"patch budgets must be multiples of {group}: {config.buckets}")
        check_budgets(config, model_config)
        names = [spec.name for spec in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"data set names must be unique: {names}")
        self.datasets = tuple(datasets)
        self.config, self.model_config = config, model_config
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = config.global_batch_size // process_count
        self._agree = agree if agree is not None else (allgather_max if process_count > 1 else None)
        sources = [open_rows(spec, config.prompt_style, check_files) for spec in self.datasets]
        self.lengths = [len(rows) for rows in sources]
        self.schedule = MixtureSchedule(self.lengths, [spec.weight for spec in self.datasets],
                                        config.global_batch_size, config.subbatch_size, config.seed)
        processor = Processor(
            copy.deepcopy(tokenizer),  # private: see _SampleLoader
            ImageProcessor(min_pixels=config.image_min_pixels, max_pixels=config.image_max_pixels),
            VideoProcessor(min_pixels=config.video_min_pixels, max_pixels=config.video_max_pixels,
                           num_frames=config.video_num_frames, frame_sampling=config.video_frame_sampling),
        )
        self._loader = _SampleLoader(self.datasets, sources, self.schedule, processor, config, process_index,
                                     self.local_batch)
        self._samples = None
        self._rows_read = self._skipped_rows = 0  # over the batches returned so far (on_bad_row "skip")
        self._last_skip = ""
        self._start(0)

    # ----------------------------------------------------------------------------- iteration

    def _start(self, step: int) -> None:
        self.close()
        n = self.local_batch
        # An unbounded index range: training runs by steps, and each epoch of each data set is reshuffled.
        samples = grain.MapDataset.range(step * n, sys.maxsize).map(self._loader)
        read = grain.ReadOptions(num_threads=self.config.num_threads,
                                 prefetch_buffer_size=self.config.prefetch_batches * n)
        self._samples = iter(samples.to_iter_dataset(read).batch(n, batch_fn=list))
        self._step = step

    def __iter__(self) -> TrainBatchIterator:
        return self

    def __next__(self) -> TrainBatch:
        samples: list[_Sample] = next(self._samples)
        # Per side: longest input, most patches, and whether any sample generates from it. A side whose
        # whole global batch generates nothing gets no target region at all, so no logits are wasted on it.
        needs = np.array([[max(len(s.sides[side]["input_ids"]) for s in samples),
                           max(_num_patches(s.sides[side]) for s in samples),
                           max((len(s.targets[side][0]) for s in samples if s.targets[side] is not None),
                               default=0)] for side in SIDES], np.int64)
        if self._agree is not None:
            needs = np.asarray(self._agree(needs.reshape(-1)), np.int64).reshape(len(SIDES), 3)
        packed = {side: self._pack(samples, side, *choose_bucket(self.config.buckets, *needs[i, :2]),
                                   target_len=choose_target_bucket(self.config.target_buckets, int(needs[i, 2])))
                  for i, side in enumerate(SIDES)}
        skipped = tuple(message for s in samples for message in s.skipped)
        batch = TrainBatch(query=packed["query"], positive=packed["positive"],
                           dataset_ids=np.array([s.dataset for s in samples], np.int32),
                           row_ids=np.array([s.row for s in samples], np.int64), step=self._step, skipped=skipped)
        self._count(len(samples), skipped)
        self._step += 1
        return batch

    def _count(self, used: int, skipped: Sequence[str]) -> None:
        """Adds a batch's rows to the counts; too large a skipped share raises `BadRowsError`."""
        self._rows_read += used + len(skipped)
        self._skipped_rows += len(skipped)
        self._last_skip = skipped[-1] if skipped else self._last_skip
        limit = self.config.max_skip_fraction
        if self._rows_read >= MIN_ROWS_BEFORE_SKIP_LIMIT and self._skipped_rows > limit * self._rows_read:
            raise BadRowsError(
                f"step {self._step}: {self._skipped_rows} of the {self._rows_read} rows read so far could not be used "
                f"({self._skipped_rows / self._rows_read:.1%}, over data.max_skip_fraction={limit}); the last: "
                f"{self._last_skip}")

    def _pack(self, samples: Sequence[_Sample], side: str, query_len: int, patch_budget: int,
              target_len: int) -> PackedBatch:
        cfg = self.config
        targets = [s.targets[side] for s in samples] if target_len else None
        return pack(_collate([s.sides[side] for s in samples]), self.model_config, num_btoks=cfg.num_btoks,
                    query_len=query_len, targets=targets, target_len=target_len,
                    rope_convention=cfg.rope_convention, patch_budget=patch_budget)

    def close(self) -> None:
        """Stops the read threads of the current grain iterator."""
        if self._samples is not None and hasattr(self._samples, "close"):
            self._samples.close()
        self._samples = None

    # ----------------------------------------------------------------------------- checkpointing

    @property
    def step(self) -> int:
        """The step of the next batch."""
        return self._step

    @property
    def skipped_rows(self) -> int:
        """This process's bad rows replaced in the batches returned so far, a resumed run's share included
        (on_bad_row "skip"); `row_counts` gives the counts of all processes."""
        return self._skipped_rows

    @property
    def rows_read(self) -> int:
        """This process's rows read for the batches returned so far: the batches' rows plus the bad rows they
        replace (a resumed run's share included)."""
        return self._rows_read

    def row_counts(self) -> tuple[int, int]:
        """(rows read, bad rows skipped) over all processes so far. With more than one process it is a collective
        (`allgather_sum`): every process must call it at the same step. The counts do not depend on the number
        of processes, since which rows are bad is a function of the seed and the positions alone."""
        local = np.array([self._rows_read, self._skipped_rows], np.int64)
        total = allgather_sum(local) if self.process_count > 1 else local
        return int(total[0]), int(total[1])

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: the next step and the row counts of all processes (`row_counts`, a collective with
        more than one process), plus what the sample order depends on (checked on restore)."""
        rows_read, skipped_rows = self.row_counts()
        return {"step": self._step, "rows_read": rows_read, "skipped_rows": skipped_rows, **self._fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a `get_state()` result; the data sets, seed and batch layout must be the same."""
        mismatched = {k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"iterator state is from another configuration (saved, current): {mismatched}")
        self._start(int(state["step"]))
        # The saved counts are those of all processes; each process takes an even share (the remainder to the
        # first ones), so the sums stay exact on any number of processes. States written before the counts existed
        # hold none: they count from the resumed step on.
        def share(total: int) -> int:
            return total // self.process_count + int(self.process_index < total % self.process_count)

        self._rows_read = share(int(state.get("rows_read", 0)))
        self._skipped_rows = share(int(state.get("skipped_rows", 0)))

    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.config
        return {"seed": cfg.seed, "global_batch_size": cfg.global_batch_size, "subbatch_size": cfg.subbatch_size,
                "datasets": [spec.name for spec in self.datasets], "lengths": list(self.lengths),
                "weights": [float(spec.weight) for spec in self.datasets]}
