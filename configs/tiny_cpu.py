r"""A tiny Qwen2-VL-architecture model trained from scratch on the embedded emoji data, on CPU.

    btoks train --config configs/tiny_cpu.py --workdir runs/tiny
    btoks train --config configs/tiny_cpu.py:runlocal --workdir runs/tiny_smoke     # a 4-step smoke run
    btoks train --config configs/tiny_cpu.py:objective=contrastive,pooling=last --workdir runs/tiny_last

    btoks train --config configs/tiny_cpu.py:pretrain --workdir runs/tiny_pretrain                # captioning
    btoks train --config configs/tiny_cpu.py:hf_dir=runs/hf_pretrain --workdir runs/tiny_adapted

Arguments (after the colon): runlocal, objective=joint|contrastive|gic, pooling=btoks|last,
mask=condensation|full (what the generated target may attend to: the BToks alone, or the whole input),
steps=N, batch=N, seed=N, data_dir=DIR (default: $BTOKS_DATA_DIR or ~/.cache/btoks_jax/emoji),
evals=0 (no evaluation hooks), gic_warmup=F (lambda only for the first fraction F of the steps, the
authors' main preset 2000/5000 = 0.4; 0 keeps it the whole run), hf_dir=DIR (start from the weights of a
Hugging Face directory of this architecture, e.g. an exported `pretrain` run, instead of a random init),
lr=F (peak learning rate, default 1e-3), save_initial (also checkpoint the weights before the first step).

`pretrain` is the generative first stage of `btoks main`: plain next-token training (the whole input visible,
no BToks, lambda 1 the whole run, no contrastive term) of each training pair's image side captioned with its
text: the emoji's name (i2t and t2i rows) or its subgroup (cls rows), so that the embedding runs adapt a model
that already generates, as the paper adapts a pretrained MLLM.
"""

from btoks_jax.train_config import base_config, default_data_dir, emoji_datasets, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, runlocal=False, objective="joint", pooling="btoks", steps=400, batch=32, seed=0,
                  data_dir="", evals=True, gic_warmup=0.4, mask="condensation", hf_dir="",
                  lr=1e-3, save_initial=False, pretrain=False)
    if a.pretrain:  # the generative first stage: captioning under the plain causal mask, nothing to pool
        a.objective, a.pooling, a.mask, a.gic_warmup, a.evals = "gic", "last", "full", 0.0, False
    c = base_config()
    c.seed = a.seed
    c.total_steps = a.steps if a.runlocal and "steps=" in (arg or "") else (4 if a.runlocal else a.steps)
    c.log_every = 1 if a.runlocal else 10
    c.model.preset = "tiny"
    c.model.hf_dir = a.hf_dir  # weights (and the architecture) of that directory; the overrides then do nothing
    c.model.overrides = {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)),
                         "vision": dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2)}
    c.step.objective = a.objective
    # The authors' main preset: lambda = 5 for the first 2000 of 5000 steps (GIC as warm-up), scaled to this run.
    # At least one step when there is a warm-up at all (a 2-step smoke run still trains the generative loss once).
    c.step.ntp_until_step = max(1, int(a.gic_warmup * c.total_steps)) if a.gic_warmup else None
    c.step.pooling = a.pooling
    c.step.mask_mode = a.mask
    # This demo's choice: each generating sample's token mean (batches of one task; independent of chunking).
    c.step.ntp_reduction = "sample_mean"
    c.step.trainable = "full"  # from scratch: every weight trains
    c.optim = dict(learning_rate=a.lr, warmup_steps=20 if not a.runlocal else 1, weight_decay=0.01, clip_norm=1.0)
    data_dir = a.data_dir or default_data_dir()
    c.data.prepare = "emoji"
    c.data.prepare_dir = data_dir
    c.data.datasets = emoji_datasets(data_dir)
    c.data.num_btoks = 0 if a.pooling == "last" else 4
    c.data.global_batch_size = 8 if a.runlocal else a.batch
    c.data.subbatch_size = c.data.global_batch_size  # one task a batch: one side generates, one compiles less
    c.data.buckets = ((32, 64),)
    c.data.target_len = 16 if a.objective != "contrastive" else 0  # 4 wrapper tokens + instruction + name
    c.data.truncate_targets = True  # this demo's own choice: the few longer emoji names are cut to 16 tokens
    c.data.image_min_pixels = 28 * 28
    c.data.image_max_pixels = 84 * 84
    c.data.num_threads = 2
    c.data.seed = a.seed
    c.checkpoint = dict(every=2 if a.runlocal else 100, keep=2, async_save=True, save_initial=a.save_initial)
    every = 0 if a.runlocal else 100
    c.evals = [dict(name="emoji", data_dir=data_dir, every=every, pooling=a.pooling, batch_size=64,
                    max_rows=32 if a.runlocal else None),
               dict(name="train_pairs", kind="train_pairs", train_files=[d["path"] for d in c.data.datasets],
                    image_root=data_dir, every=every, pooling=a.pooling, batch_size=64,
                    max_rows=32 if a.runlocal else 256)] if a.evals else []
    return c
