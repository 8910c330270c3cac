r"""The authors' v2 variant on Qwen2-VL-2B: the 2B recipe with a learned attention-pooling head.

    btoks train --config configs/qwen2vl_2b_v2.py:data_root=/data/mmeb_train \
        --config.model.hf_dir=/models/Qwen2-VL-2B-Instruct --workdir gs://BUCKET/btoks_2b_v2

What differs from configs/qwen2vl_2b.py, each from the authors' files (configs/README.md, "The v2 variant"):
the embedding is `BToksAttentionPooling` over the BToks (`configs/models/btoks_qwen2vl_2b_v2.yaml`: mlp_ratio
4.0, dropout 0.1, attention_scale true; see `btoks_jax.head`), trained with the adapters; and lambda = 5 holds
for the whole run (`configs/presets/btoks_qwen2vl_2b_v2.yaml`: generation_loss_duration 5000). Arguments are
those of configs/qwen2vl_2b.py.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("qwen2vl_2b", os.path.join(os.path.dirname(__file__), "qwen2vl_2b.py"))
_recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipe)

HEAD = dict(kind="attention", mlp_ratio=4.0, dropout=0.1, attention_scale=True)


def get_config(arg=None):
    parts = [p for p in (arg or "").split(",") if p]
    # generation_loss_duration 5000 of 5000 steps: lambda for the whole run.
    c = _recipe.get_config(",".join(parts + ([] if "gic_whole_run" in parts else ["gic_whole_run"])))
    c.model.head = dict(HEAD)
    return c
