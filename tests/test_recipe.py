"""The 2B recipe runs through its own code paths: `configs/qwen2vl_2b.py:runlocal` trains and learns."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from btoks_jax import build, train_step
from btoks_jax import train as trainer
from btoks_jax.data.emoji_dataset import build_emoji_dataset
from btoks_jax.data.mmeb_train import DatasetSpec
from btoks_jax.data.pipeline import TrainBatchIterator
from btoks_jax.processing import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "qwen2vl_2b.py")


def recipe(arg: str | None = None):
    """`configs/qwen2vl_2b.py[:arg]` as `btoks train --config` loads it."""
    spec = importlib.util.spec_from_file_location("qwen2vl_2b", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def emoji_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("emoji"))
    build_emoji_dataset(d, max_concepts=40)
    return d


def _first_batch_losses(config, params_list, graphdef, frozen, mesh):
    """[(loss, metrics)] of step 0's batch under each of `params_list`, with step 0's dropout key (deterministic),
    through one compiled program."""
    tokenizer = load_tokenizer()
    model_cfg = build.model_config(config.model.to_dict())
    data = TrainBatchIterator([DatasetSpec(**d) for d in config.data.to_dict()["datasets"]],
                              trainer.pipeline_config(config), model_cfg, tokenizer)
    tb = next(data)
    data.close()
    batch = trainer._device_batch(tb, mesh)
    layouts = (tb.query.layout, tb.positive.layout)
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    fn = jax.jit(lambda p: train_step.loss_and_grads(graphdef, p, frozen, batch, layouts, key,
                                                     trainer.step_config(config))[:2])
    return [(float(loss), {k: float(v) for k, v in metrics.items()}) for loss, metrics in map(fn, params_list)]


# Few steps, so few distinct step programs compile: the dense run takes 4 (two joint steps inside the lambda window,
# two contrastive ones after it, a checkpoint at the end), the splash kernel, which runs in Pallas interpret mode on
# CPU, slowly, 2 (one joint step, one contrastive step).
@pytest.mark.parametrize("attention,steps", [("dense", 4), ("splash", 2)])
def test_runlocal_trains_through_the_recipe_code_paths(emoji_dir, tmp_path, attention, steps, caplog):
    """`btoks train --config configs/qwen2vl_2b.py:runlocal [--config.model.attention_impl=...]`, in process."""
    from btoks_jax import cli

    config = recipe(f"runlocal,steps={steps},data_root={emoji_dir}")
    config.model.attention_impl = attention  # the recipe's is splash (Pallas interpret mode on CPU)
    # Only sizes differ from the 2B recipe: the code paths are all switched on.
    full = recipe("data_root=unused")
    for key in ("dtype", "param_dtype", "remat", "btok_init"):
        assert config.model[key] == full.model[key]
    assert config.model.dtype == "bfloat16" and config.model.param_dtype == "float32" and config.model.remat
    assert config.lora.to_dict() == full.lora.to_dict() and config.lora.dora and config.lora.dropout == 0.05
    assert {k: v for k, v in config.step.to_dict().items() if k not in ("chunk_size", "ntp_until_step")} == \
        {k: v for k, v in full.step.to_dict().items() if k not in ("chunk_size", "ntp_until_step")}
    assert 0 < config.step.chunk_size < config.data.global_batch_size  # GradCache chunks
    assert 0 < config.step.ntp_until_step < config.total_steps  # the lambda window ends inside the run
    assert len({d["ntp_side"] for d in config.data.datasets}) == 2  # sets generate different sides

    workdir = str(tmp_path / "run")
    with caplog.at_level("INFO", logger="btoks.train"):
        assert cli.main(["train", "--config", f"{RECIPE}:runlocal,steps={steps},data_root={emoji_dir}",
                         "--workdir", workdir, f"--config.model.attention_impl={attention}",
                         "--config.progress=False"]) == 0
    # A bounded number of step programs, printed before training and counted as they compile.
    (bound,) = [int(r.getMessage().split()[2]) for r in caplog.records if "step programs:" in r.getMessage()]
    compiled = [r for r in caplog.records if r.getMessage().startswith("compiling step program")]
    assert bound == 2 * 2 * 2 * 2 * 2  # ((patches, none) x (target, none))^2 x (joint, contrastive)
    assert 1 <= len(compiled) <= bound
    assert jax.config.jax_compilation_cache_dir  # the persistent compilation cache is on
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, config.total_steps + 1))
    assert all(np.isfinite(r["loss"]) for r in losses)
    window = config.step.ntp_until_step
    assert all(r["ntp_weight"] == 5.0 and r["ntp"] > 0 for r in losses[:window])
    assert all(r["ntp_weight"] == 0.0 for r in losses[window:])

    # The losses go down: step 0's batch scores lower under the trained weights than under the initial ones.
    mesh = trainer.sharding.make_mesh(**config.mesh.to_dict())
    model_cfg = build.model_config(config.model.to_dict())
    initial = build.build(model_cfg, num_btoks=config.data.num_btoks, lora=trainer.lora_config(config),
                          seed=config.seed, mesh=mesh, progress=False)
    graphdef, params0, frozen = train_step.split_model(initial, config.step.trainable)
    trained, _ = build.restore_model(workdir, mesh=mesh)
    _, params1, _ = train_step.split_model(trained, config.step.trainable)
    (before, m0), (after, m1) = _first_batch_losses(config, [params0, params1], graphdef, frozen, mesh)
    assert before == pytest.approx(losses[0]["loss"], rel=1e-3)  # the same computation the trainer logged
    assert after < before, (m0, m1)
    assert m1["ntp"] < m0["ntp"] and m1["info_nce"] < m0["info_nce"], (m0, m1)


def test_evaluation_hook_compiles_once(emoji_dir):
    """A hook embeds every time with the weights of that moment, through the same jitted programs."""
    from flax import nnx

    from btoks_jax.evaluate.hooks import make_hooks

    config = recipe(f"runlocal,data_root={emoji_dir}")
    model_cfg = build.model_config(config.model.to_dict())
    meta = trainer.run_meta(config, model_cfg)
    mesh = trainer.sharding.make_mesh(devices=jax.devices()[:1])
    (hook,) = make_hooks([dict(name="emoji", data_dir=emoji_dir, every=1, max_rows=8, batch_size=8,
                               datasets=["emoji_i2t"])], tokenizer=load_tokenizer(), meta=meta, mesh=mesh)
    model = build.build(model_cfg, num_btoks=4, lora=trainer.lora_config(config), seed=0, mesh=mesh, progress=False)
    graphdef, state = nnx.split(model)
    first = hook(nnx.merge(graphdef, state), 1)
    compiled = hook._embedder._embed_fns
    programs = {key: fn._cache_size() for key, fn in compiled.items()}  # one per input shape met
    assert programs and all(n >= 1 for n in programs.values())
    shifted = jax.tree.map(lambda x: x * 1.5 if x.dtype == np.float32 else x, state)
    second = hook(nnx.merge(graphdef, shifted), 2)
    assert hook._embedder._embed_fns is compiled
    assert {key: fn._cache_size() for key, fn in compiled.items()} == programs  # nothing recompiled
    assert set(first) == set(second)
    from btoks_jax.evaluate.mmeb import Item

    items = [Item(text="a red apple"), Item(text="a blue car")]
    e1 = hook.embed_fn(nnx.merge(graphdef, state))(items)
    programs = {key: fn._cache_size() for key, fn in compiled.items()}  # text-only inputs: a shape of their own
    e2 = hook.embed_fn(nnx.merge(graphdef, shifted))(items)
    assert np.abs(e1 - e2).max() > 1e-3  # ...and the new weights were used
    assert {key: fn._cache_size() for key, fn in compiled.items()} == programs


def test_lora_a_starts_gaussian_with_std_one_over_rank():
    """PEFT's init_lora_weights="gaussian" (the authors' setting): A ~ N(0, (1/r)^2), B = 0."""
    from flax import nnx

    from btoks_jax.lora import LoRAAdapter, LoRAConfig, apply_lora
    from btoks_jax.model import Qwen2VL

    config = recipe("data_root=unused")
    lora = trainer.lora_config(config)
    assert lora.init == "gaussian" and lora.rank == 16
    model_cfg = build.model_config(recipe("runlocal").model.to_dict())
    backbone = Qwen2VL(model_cfg, rngs=nnx.Rngs(0))
    apply_lora(backbone, lora, rngs=nnx.Rngs(1))
    adapters = [m for _, m in nnx.iter_graph(backbone) if isinstance(m, LoRAAdapter)]
    a = np.concatenate([np.asarray(m.a.value).ravel() for m in adapters])
    assert abs(a.std() - 1 / 16) < 0.002 and abs(a.mean()) < 0.002
    assert all(not np.asarray(m.b.value).any() for m in adapters)
    kaiming = LoRAConfig(rank=16, init="kaiming")
    apply_lora(backbone, kaiming, rngs=nnx.Rngs(1))
    layer = backbone.model.layers[0].self_attn.q_proj
    bound = 1 / np.sqrt(layer.kernel.shape[0])
    assert np.abs(np.asarray(layer.lora.a.value)).max() <= bound


def _recipe_table() -> tuple[dict[str, object], dict[str, tuple[float, str]]]:
    """(config key -> value, data set -> (weight, ntp_side)) as configs/README.md states them."""
    import ast

    settings, mixture = {}, {}
    with open(os.path.join(ROOT, "configs", "README.md"), encoding="utf-8") as f:
        section = f.read().split("## The 2B recipe", 1)[1].split("\n## ", 1)[0]
    rows = 0
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith("|---") or line.startswith("| setting") or \
                line.startswith("| data set"):
            continue
        rows += 1
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # "\|" is a pipe inside a cell
        if len(cells) == 4 and cells[1].startswith("`") and cells[2].startswith("`"):
            settings[cells[1].strip("`")] = ast.literal_eval(cells[2].strip("`"))
        elif len(cells) == 3 and cells[1].replace(".", "", 1).isdigit():
            mixture[cells[0]] = (float(cells[1]), cells[2])
    assert rows == len(settings) + len(mixture), "a table row was not understood"
    return settings, mixture


def test_recipe_config_equals_the_documented_table():
    settings, mixture = _recipe_table()
    assert len(settings) == 49 and len(mixture) == 25
    config = recipe("data_root=/data/mmeb_train")
    for key, value in settings.items():
        got = config
        for part in key.split("."):
            got = got[part]
        got = tuple(got) if isinstance(got, list) else got
        assert got == value and type(got) is type(value), (key, got, value)
    assert {d["name"]: (d["weight"], d["ntp_side"]) for d in config.data.datasets} == mixture
    assert all(d["path"] == f"/data/mmeb_train/{d['name']}.jsonl" for d in config.data.datasets)
    # The settings the table names are the ones the trainer uses.
    lora, step = trainer.lora_config(config), trainer.step_config(config)
    assert (lora.rank, lora.alpha, lora.dropout, lora.dora, lora.init) == (16, 32.0, 0.05, True, "gaussian")
    assert (step.ntp_until_step, step.ntp_reduction, step.ntp_chunk_size) == (2000, "chunk_token_mean", 8)
    assert recipe("data_root=/d,gic_whole_run").step.ntp_until_step is None


def test_v2_attention_pooling_head_equals_the_authors_module():
    """The v2 head against the authors' BToksAttentionPooling restated with torch.nn (Linear D->1 scores
    scaled by 1/sqrt(D), softmax over the BToks, Linear-GELU-Dropout-Linear-Dropout, LayerNorm of the residual)."""
    import torch
    from flax import nnx

    from btoks_jax.head import AttentionPoolingConfig, AttentionPoolingHead

    d, k = 32, 4
    head = AttentionPoolingHead(d, AttentionPoolingConfig(mlp_ratio=4.0, dropout=0.1), rngs=nnx.Rngs(0))
    head.eval()
    attention = torch.nn.Linear(d, 1)
    mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Dropout(0.1),
                              torch.nn.Linear(4 * d, d), torch.nn.Dropout(0.1))
    norm = torch.nn.LayerNorm(d)
    weights = {key: torch.from_numpy(np.array(v)) for key, v in head.torch_state_dict().items()}
    weights["layer_norm.weight"] = weights["layer_norm.weight"] + 0.1  # not the identity
    head.norm_weight.value = head.norm_weight.value + 0.1
    with torch.no_grad():
        attention.weight.copy_(weights["attention.weight"]), attention.bias.copy_(weights["attention.bias"])
        mlp[0].weight.copy_(weights["mlp.0.weight"]), mlp[0].bias.copy_(weights["mlp.0.bias"])
        mlp[3].weight.copy_(weights["mlp.3.weight"]), mlp[3].bias.copy_(weights["mlp.3.bias"])
        norm.weight.copy_(weights["layer_norm.weight"]), norm.bias.copy_(weights["layer_norm.bias"])
    mlp.eval()
    hidden = np.random.default_rng(0).standard_normal((3, k, d)).astype(np.float32)
    with torch.no_grad():
        h = torch.from_numpy(hidden)
        a = torch.softmax(attention(h) / d**0.5, dim=1)
        x = (h * a).sum(1)
        ref = norm(x + mlp(x)).numpy()
    assert np.abs(np.asarray(head(jnp.asarray(hidden))) - ref).max() <= 1e-5
    # Initial weights as the authors' module starts: xavier-uniform scores with zero bias.
    fresh = AttentionPoolingHead(1536, AttentionPoolingConfig(), rngs=nnx.Rngs(1))
    assert not np.asarray(fresh.score_bias.value).any()
    assert np.abs(np.asarray(fresh.score_kernel.value)).max() <= np.sqrt(6 / 1537)
    assert fresh.mlp_in_kernel.shape == (1536, 6144)


def test_v2_runlocal_trains_the_head(emoji_dir, tmp_path):
    """configs/qwen2vl_2b_v2.py through its own code path: the head trains with the adapters."""
    spec = importlib.util.spec_from_file_location("qwen2vl_2b_v2", os.path.join(ROOT, "configs", "qwen2vl_2b_v2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"runlocal,data_root={emoji_dir},steps=2")
    assert config.model.head.to_dict() == {"kind": "attention", "mlp_ratio": 4.0, "dropout": 0.1,
                                           "attention_scale": True}
    assert config.step.ntp_until_step is None  # generation_loss_duration 5000: lambda the whole run
    config.model.attention_impl = "dense"  # the splash path of the same step is trained by the 2B test above
    config.progress = False
    workdir = str(tmp_path / "v2")
    trainer.train(config, workdir)
    trained, meta = build.restore_model(workdir)
    assert meta["head"]["kind"] == "attention" and trained.head is not None
    model_cfg = build.model_config(config.model.to_dict())
    initial = build.build(model_cfg, num_btoks=4, lora=trainer.lora_config(config), seed=config.seed, progress=False,
                          head=build.head_config(config.model))
    moved = np.abs(np.asarray(trained.head.mlp_out_kernel.value) - np.asarray(initial.head.mlp_out_kernel.value))
    assert moved.max() > 0  # the head is trained
    base0 = np.asarray(initial.backbone.model.layers[0].mlp.gate_proj.kernel.value)
    assert np.array_equal(np.asarray(trained.backbone.model.layers[0].mlp.gate_proj.kernel.value), base0)
