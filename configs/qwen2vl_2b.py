r"""The authors' headline recipe on Qwen2-VL-2B (PAPER.md section 6): LoRA (DoRA) + 4 BToks, joint loss.

    btoks train --config configs/qwen2vl_2b.py:data_root=/data/mmeb_train \
        --config.model.hf_dir=/models/Qwen2-VL-2B-Instruct --workdir gs://BUCKET/btoks_2b

Every setting and the authors' file it comes from is in configs/README.md ("The 2B recipe"), and
tests/test_recipe.py holds this file to that table.

Arguments (after the colon): data_root=DIR (MMEB-train folder: one `<subset>.jsonl` or `.parquet`
per data set, images and frames under it), media_root=DIR (where the media lie when not under data_root:
the download root of a mixture that `btoks data prepare --out data_root` wrote elsewhere; media paths
leaving both are refused), gic_whole_run (lambda = 5 for all 5000 steps, the authors' other presets;
default: the main preset's first 2000 steps), chunk=N (GradCache chunk in global rows, default 128 = 8
rows per chip on 16 chips; a memory choice, the loss is exact whatever the chunk), runlocal (the same code
paths at CPU size, see `shrink_to_local`), steps=N (runlocal),
mixture=emoji|mmeb (runlocal: the embedded emoji mixture, data_root naming where it is built, or the published
mixture prepared by `btoks data prepare` under data_root, e.g. its miniature test fixtures).

The mixture is the VLM2Vec-V2 one with the authors' weights and generated sides; a data set missing
under data_root fails loudly.
"""

import os

from btoks_jax.train_config import base_config, parse_arg

# (name, ntp_side, weight): the authors' configs/datasets/mmeb_train.yaml (weights) and
# configs/datasets/btoks_mmeb_train.yaml (ntp_side: which side's text the other side's BToks generate).
MMEB_TRAIN = [
    ("ImageNet_1K", "positive", 1.0), ("N24News", "positive", 1.0), ("HatefulMemes", "positive", 0.5),
    ("VOC2007", "positive", 0.5), ("SUN397", "positive", 0.5), ("OK-VQA", "positive", 0.5),
    ("A-OKVQA", "positive", 0.5), ("DocVQA", "positive", 1.0), ("InfographicsVQA", "positive", 0.5),
    ("ChartQA", "positive", 0.5), ("Visual7W", "positive", 1.0), ("VisDial", "query", 1.0), ("CIRR", "none", 0.5),
    ("VisualNews_t2i", "query", 1.0), ("VisualNews_i2t", "positive", 1.0), ("MSCOCO_t2i", "query", 1.0),
    ("MSCOCO_i2t", "positive", 1.0), ("NIGHTS", "none", 0.5), ("WebQA", "both", 0.5), ("MSCOCO", "query", 1.0),
]
# ViDoRe's colpali_train_set (the page + question generate the answer), VisRAG in-domain (the page's BToks
# generate the query), and the LLaVA-Hound video sets: captioning, its text-to-video twin, and video QA.
EXTRA = [
    ("colpali_train_set", "positive", 10.0), ("visrag-indomain", "query", 12.0),
    ("video_caption_300k", "positive", 5.0), ("video_caption_300k-video", "query", 5.0),
    ("video_qa_240k", "positive", 5.0),
]


def get_config(arg=None):
    a = parse_arg(arg, data_root="", media_root="", gic_whole_run=False, chunk=128, runlocal=False, steps=8,
                  mixture="emoji")
    c = base_config()
    c.seed = 42
    c.total_steps = 5000
    c.log_every = 10
    c.model.preset = "qwen2-vl-2b"  # the architecture when no weights are given (and what hf_dir must match)
    c.model.hf_dir = ""  # --config.model.hf_dir=/path/to/Qwen2-VL-2B-Instruct
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.model.attention_impl = "splash"
    c.model.btok_init = "vocab_rows"  # what the reference code did: the 2B vocabulary already had the rows
    c.lora = dict(enabled=True, rank=16, alpha=32.0, dropout=0.05, dora=True, init="gaussian",
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    c.step.objective = "joint"
    c.step.temperature = 0.02
    c.step.pooling = "btoks"
    c.step.mask_mode = "condensation"
    c.step.symmetric = False
    c.step.ntp_weight = 5.0
    c.step.ntp_until_step = None if a.gic_whole_run else 2000
    c.step.ntp_reduction = "chunk_token_mean"
    c.step.ntp_chunk_size = 8
    c.step.chunk_size = a.chunk
    c.step.trainable = "lora"
    c.optim = dict(learning_rate=5e-5, warmup_steps=100, weight_decay=0.01, clip_norm=1.0, b1=0.9, b2=0.999,
                   eps=1e-8)
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.data.num_btoks = 4
    c.data.seed = 42
    c.data.global_batch_size = 1024
    c.data.subbatch_size = 512
    c.data.prompt_style = "btoks"
    c.data.rope_convention = "legacy"
    c.data.image_min_pixels, c.data.image_max_pixels = 28 * 28 * 4, 28 * 28 * 1280
    c.data.video_min_pixels, c.data.video_max_pixels = 28 * 28 * 4, 28 * 28 * 768
    c.data.video_num_frames, c.data.video_frame_sampling = 8, "linspace"
    # Targets are never cut (the authors truncate nothing); regions in four lengths so class names do not pay
    # for captions. A longer target stops the run naming its row.
    c.data.target_len, c.data.target_buckets, c.data.truncate_targets = 512, (64, 128, 256, 512), False
    root = a.data_root
    # Media paths must stay inside data_root, or media_root where one is named (DatasetSpec.media_roots).
    media = (a.media_root,) if a.media_root else ()
    c.data.datasets = [dict(name=n, path=os.path.join(root, f"{n}.jsonl"), image_root=root, media_roots=media,
                            weight=w, ntp_side=side) for n, side, w in MMEB_TRAIN + EXTRA]
    c.checkpoint = dict(every=250, keep=3, async_save=True)
    if a.mixture not in ("emoji", "mmeb"):
        raise ValueError(f"configs/qwen2vl_2b.py: mixture must be emoji or mmeb, got {a.mixture!r}")
    if a.runlocal:
        shrink_to_local(c, steps=a.steps, data_dir=a.data_root, mixture=a.mixture)
    elif not root:
        raise ValueError("configs/qwen2vl_2b.py needs data_root=DIR (the MMEB-train folder), e.g. "
                         "--config configs/qwen2vl_2b.py:data_root=/data/mmeb_train")
    return c


def shrink_to_local(c, *, steps: int = 8, data_dir: str = "", mixture: str = "emoji") -> None:
    """The recipe at CPU size: only sizes and durations shrink, every code path stays the recipe's (bf16
    compute over float32 masters, remat, DoRA with dropout, GradCache chunks, the lambda window, the
    chunk-token-mean GIC reduction, a mixture whose sets generate different sides, the attention kernel).

    Sizes: the tiny Qwen2-VL preset, the embedded emoji mixture (three sets; ntp_side positive, query,
    positive; built on first use in `data_dir`, default $BTOKS_DATA_DIR or ~/.cache/btoks_jax/emoji), batch 16
    in GradCache chunks of 8, one bucket, 8 steps with warm-up and the lambda window scaled from 100 and
    2000 of 5000 steps, a checkpoint every 4 steps.

    mixture="mmeb" keeps the recipe's own 25-set mixture, read from `data_dir` as `btoks data prepare` writes it
    (the miniature fixtures in CI), with budgets that hold its longest prompts (VisRAG's instructions, 8-frame
    videos) in two buckets.
    """
    from btoks_jax.train_config import default_data_dir, emoji_datasets

    if mixture == "mmeb" and not data_dir:
        raise ValueError("configs/qwen2vl_2b.py:runlocal,mixture=mmeb needs data_root=DIR (a prepared mixture)")
    data_dir = data_dir or default_data_dir()

    scale = steps / c.total_steps
    c.model.preset = "tiny"
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.total_steps, c.log_every = steps, 1
    c.optim.warmup_steps = max(1, round(c.optim.warmup_steps * scale))
    if c.step.ntp_until_step is not None:
        c.step.ntp_until_step = max(1, round(c.step.ntp_until_step * scale))
    c.step.chunk_size = 8
    c.data.global_batch_size, c.data.subbatch_size = 16, 8
    if mixture == "mmeb":
        c.data.buckets = ((96, 128), (192, 256))
        c.data.target_len, c.data.target_buckets = 128, (32, 128)
    else:
        c.data.prepare, c.data.prepare_dir = "emoji", data_dir
        c.data.datasets = emoji_datasets(data_dir)
        c.data.buckets = ((32, 64),)
        c.data.target_len, c.data.target_buckets = 32, (32,)
    c.data.image_max_pixels = 84 * 84
    c.data.image_min_pixels = 28 * 28
    c.data.video_min_pixels, c.data.video_max_pixels = 28 * 28, 56 * 56
    c.data.num_threads = 2
    c.checkpoint = dict(every=4, keep=1, async_save=True)
