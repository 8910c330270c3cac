"""The 2B recipe runs through its own code paths: `configs/qwen2vl_2b.py:runlocal` trains and learns."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from btoks_jax import build
from btoks_jax import train as trainer
from btoks_jax import train_step as TS
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


def _first_batch_loss(config, params, graphdef, frozen, mesh):
    """The training loss of step 0's batch under `params`, with step 0's dropout key (deterministic)."""
    tokenizer = load_tokenizer()
    mcfg = build.model_config(config.model.to_dict())
    data = TrainBatchIterator([DatasetSpec(**d) for d in config.data.to_dict()["datasets"]],
                              trainer.pipeline_config(config), mcfg, tokenizer)
    tb = next(data)
    data.close()
    batch = trainer._device_batch(tb, None, mesh)
    layouts = (tb.query.layout, tb.positive.layout)
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    loss, metrics, _ = jax.jit(lambda p: TS.loss_and_grads(graphdef, p, frozen, batch, layouts, 0, key,
                                                           trainer.step_config(config)))(params)
    return float(loss), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("attention", ["dense", "splash"])
def test_runlocal_trains_through_the_recipe_code_paths(emoji_dir, tmp_path, attention):
    config = recipe(f"runlocal,data_root={emoji_dir}")
    config.model.attention_impl = attention  # the recipe's is splash (Pallas interpret mode on CPU)
    config.progress = False
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
    trainer.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, config.total_steps + 1))
    assert all(np.isfinite(r["loss"]) for r in losses)
    window = config.step.ntp_until_step
    assert all(r["ntp_weight"] == 5.0 and r["ntp"] > 0 for r in losses[:window])
    assert all(r["ntp_weight"] == 0.0 for r in losses[window:])

    # The losses go down: step 0's batch scores lower under the trained weights than under the initial ones.
    mesh = trainer.shd.make_mesh(**config.mesh.to_dict())
    mcfg = build.model_config(config.model.to_dict())
    initial = build.build(mcfg, num_btoks=config.data.num_btoks, lora=trainer.lora_config(config), seed=config.seed,
                          mesh=mesh, progress=False)
    graphdef, params0, frozen = TS.split_model(initial, config.step.trainable)
    trained, _ = trainer.restore_model(workdir, mesh=mesh)
    _, params1, _ = TS.split_model(trained, config.step.trainable)
    before, m0 = _first_batch_loss(config, params0, graphdef, frozen, mesh)
    after, m1 = _first_batch_loss(config, params1, graphdef, frozen, mesh)
    assert before == pytest.approx(losses[0]["loss"], rel=1e-3)  # the same computation the trainer logged
    assert after < before, (m0, m1)
    assert m1["ntp"] < m0["ntp"] and m1["info_nce"] < m0["info_nce"], (m0, m1)


def test_evaluation_hook_compiles_once(emoji_dir):
    """A hook embeds every time with the weights of that moment, through the same jitted programs."""
    from flax import nnx

    from btoks_jax.evaluate.hooks import make_hooks

    config = recipe(f"runlocal,data_root={emoji_dir}")
    mcfg = build.model_config(config.model.to_dict())
    meta = trainer.run_meta(config, mcfg)
    mesh = trainer.shd.make_mesh(devices=jax.devices()[:1])
    (hook,) = make_hooks([dict(name="emoji", data_dir=emoji_dir, every=1, max_rows=8, batch_size=8,
                               datasets=["emoji_i2t"])], workdir="", tokenizer=load_tokenizer(), mcfg=mcfg,
                         meta=meta, mesh=mesh)
    model = build.build(mcfg, num_btoks=4, lora=trainer.lora_config(config), seed=0, mesh=mesh, progress=False)
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
    mcfg = build.model_config(recipe("runlocal").model.to_dict())
    backbone = Qwen2VL(mcfg, rngs=nnx.Rngs(0))
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
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) == 4 and cells[1].startswith("`") and cells[2].startswith("`"):
            settings[cells[1].strip("`")] = ast.literal_eval(cells[2].strip("`"))
        elif len(cells) == 3 and cells[1].replace(".", "", 1).isdigit():
            mixture[cells[0]] = (float(cells[1]), cells[2])
    return settings, mixture


def test_recipe_config_equals_the_documented_table():
    settings, mixture = _recipe_table()
    assert len(settings) >= 40 and len(mixture) == 25
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
