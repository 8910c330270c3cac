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
    a = parse_arg(arg, data_root="", gic_warmup=False, chunk=128, runlocal=False)
    c = base_config()
    c.total_steps = 5000
    c.log_every = 10
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
    c.step.ntp_until_step = 2000 if a.gic_warmup else None
    c.step.ntp_reduction = "sample_mean"
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
        from btoks_jax.config_base import default_data_dir, emoji_datasets

        c.model = dict(preset="tiny", hf_dir="", overrides={}, dtype="float32", param_dtype="float32",
                       attention_impl="dense", remat=True, btok_init="im_end")
        c.mesh = dict(data=-1, fsdp=1, tensor=1)
        c.total_steps, c.log_every = 2, 1
        c.step.chunk_size = 4
        c.data.prepare, c.data.prepare_dir = "emoji", default_data_dir()
        c.data.datasets = emoji_datasets(default_data_dir())
        c.data.global_batch_size, c.data.subbatch_size = 8, 4
        c.data.buckets = ((32, 64),)
        c.data.target_len = 16
        c.data.image_max_pixels = 84 * 84
        c.data.image_min_pixels = 28 * 28
        c.data.num_threads = 2
        c.checkpoint = dict(every=1, keep=1, async_save=False)
    elif not root:
        raise ValueError("configs/qwen2vl_2b.py needs data_root=DIR (the MMEB-train folder), e.g. "
                         "--config configs/qwen2vl_2b.py:data_root=/data/mmeb_train")
    return c
