r"""The authors' headline recipe on Qwen2-VL-2B (PAPER.md section 6): LoRA (DoRA) + 4 BToks, joint loss.

    btoks train --config configs/qwen2vl_2b.py:data_root=/data/mmeb_train \
        --config.model.hf_dir=/models/Qwen2-VL-2B-Instruct --workdir gs://BUCKET/btoks_2b

Arguments (after the colon): data_root=DIR (MMEB-train folder: one `<subset>.jsonl` or `.parquet`
per data set, images under `images/`), gic_warmup (lambda only for the first 2000 of 5000 steps,
the main preset; default: lambda for the whole run), chunk=N (GradCache chunk rows, default 128),
runlocal (a shrunken smoke version: tiny model, 2 steps).

The mixture lists the VLM2Vec-V2 training sets; a data set missing under data_root fails loudly.
MMEB-train subsets weigh 1; ViDoRe colpali_train_set 10, VisRAG in-domain 12, LLaVA-Hound video
sets 5 (the reference code's weights).
"""

import os

from btoks_jax.config_args import parse_arg
from btoks_jax.config_base import base_config

# (name, ntp_side, weight). ntp_side: which side's text is generated from the other side's BToks.
MMEB_TRAIN = [
    ("ImageNet_1K", "positive"), ("N24News", "positive"), ("HatefulMemes", "positive"), ("VOC2007", "positive"),
    ("SUN397", "positive"), ("OK-VQA", "positive"), ("A-OKVQA", "positive"), ("DocVQA", "positive"),
    ("InfographicsVQA", "positive"), ("ChartQA", "positive"), ("Visual7W", "positive"), ("VisDial", "query"),
    ("CIRR", "none"), ("VisualNews_t2i", "query"), ("VisualNews_i2t", "positive"), ("MSCOCO_t2i", "query"),
    ("MSCOCO_i2t", "positive"), ("NIGHTS", "none"), ("WebQA", "both"), ("MSCOCO", "positive"),
]
EXTRA = [("colpali_train_set", "query", 10.0), ("visrag_indomain", "query", 12.0),
         ("llavahound_caption", "positive", 5.0), ("llavahound_qa", "positive", 5.0)]


def get_config(arg=None):
    a = parse_arg(arg, data_root="", gic_whole_run=False, chunk=128, runlocal=False, steps=8)
    c = base_config()
    c.total_steps = 5000
    c.log_every = 10
    c.model.preset = "qwen2-vl-2b"  # the architecture when no weights are given (and what hf_dir must match)
    c.model.hf_dir = ""  # --config.model.hf_dir=/path/to/Qwen2-VL-2B-Instruct
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.model.attention_impl = "splash"
    c.model.btok_init = "vocab_rows"  # what the reference code did: the 2B vocabulary already had the rows
    c.lora = dict(enabled=True, rank=16, alpha=32.0, dropout=0.05, dora=True,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    c.step.objective = "joint"
    c.step.ntp_weight = 5.0
    c.step.ntp_until_step = None if a.gic_whole_run else 2000
    c.step.ntp_reduction = "chunk_token_mean"
    c.step.ntp_chunk_size = 8
    c.step.chunk_size = a.chunk
    c.step.trainable = "lora"
    c.optim = dict(learning_rate=5e-5, warmup_steps=100, weight_decay=0.01, clip_norm=1.0)
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.data.global_batch_size = 1024
    c.data.subbatch_size = 512
    c.data.prompt_style = "btoks"
    c.data.rope_convention = "legacy"
    root = a.data_root
    c.data.datasets = [dict(name=n, path=os.path.join(root, f"{n}.jsonl"), image_root=root, weight=1.0, ntp_side=s)
                       for n, s in MMEB_TRAIN]
    c.data.datasets += [dict(name=n, path=os.path.join(root, f"{n}.jsonl"), image_root=root, weight=w, ntp_side=s)
                        for n, s, w in EXTRA]
    c.checkpoint = dict(every=250, keep=3, async_save=True)
    if a.runlocal:
        shrink_to_local(c, steps=a.steps, data_dir=a.data_root)
    elif not root:
        raise ValueError("configs/qwen2vl_2b.py needs data_root=DIR (the MMEB-train folder), e.g. "
                         "--config configs/qwen2vl_2b.py:data_root=/data/mmeb_train")
    return c


def shrink_to_local(c, *, steps: int = 8, data_dir: str = "") -> None:
    """The recipe at CPU size: only sizes and durations shrink, every code path stays the recipe's (bf16
    compute over float32 masters, remat, DoRA with dropout, GradCache chunks, the lambda window, the
    chunk-token-mean GIC reduction, a mixture whose sets generate different sides, the attention kernel).

    Sizes: the tiny Qwen2-VL preset, the embedded emoji mixture (three sets; ntp_side positive, query,
    positive; built on first use in `data_dir`, default $BTOKS_DATA_DIR or ~/.cache/btoks_jax/emoji), batch 16
    in GradCache chunks of 8, one bucket, 8 steps with warm-up and the lambda window scaled from 100 and
    2000 of 5000 steps, a checkpoint every 4 steps.
    """
    from btoks_jax.config_base import default_data_dir, emoji_datasets

    data_dir = data_dir or default_data_dir()

    scale = steps / c.total_steps
    c.model.preset = "tiny"
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.total_steps, c.log_every = steps, 1
    c.optim.warmup_steps = max(1, round(c.optim.warmup_steps * scale))
    if c.step.ntp_until_step is not None:
        c.step.ntp_until_step = max(1, round(c.step.ntp_until_step * scale))
    c.step.chunk_size = 8
    c.data.prepare, c.data.prepare_dir = "emoji", data_dir
    c.data.datasets = emoji_datasets(data_dir)
    c.data.global_batch_size, c.data.subbatch_size = 16, 8
    c.data.buckets = ((32, 64),)
    c.data.target_len, c.data.target_buckets = 32, None
    c.data.image_max_pixels = 84 * 84
    c.data.image_min_pixels = 28 * 28
    c.data.video_min_pixels, c.data.video_max_pixels = 28 * 28, 56 * 56
    c.data.num_threads = 2
    c.checkpoint = dict(every=4, keep=1, async_save=True)
