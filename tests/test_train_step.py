"""Train steps: GradCache equals the full-batch gradient; a 2x2x2 mesh step equals the single-device step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils as U
from jax.sharding import PartitionSpec as P

from btoks_jax import build, sharding, train_step
from btoks_jax.lora import LoRAConfig

LORA = LoRAConfig(rank=4, alpha=8, dropout=0.0)


@pytest.mark.parametrize("objective", ["contrastive", "gic", "joint"])
def test_gradcache_equals_full_batch(objective):
    model = U.model()
    batch, layouts = U.batch()
    g, params, frozen = train_step.split_model(model, "lora")
    out = {}
    for chunk in (0, 2):
        cfg = train_step.StepConfig(objective=objective, chunk_size=chunk)
        f = jax.jit(lambda p, fr, b, cfg=cfg:
                    train_step.loss_and_grads(g, p, fr, b, layouts, jax.random.key(0), cfg)[1:])
        out[chunk] = f(params, frozen, batch)
    (m0, g0), (m2, g2) = out[0], out[2]
    assert abs(float(m0["loss"]) - float(m2["loss"])) <= 1e-5 * max(1.0, abs(float(m0["loss"])))
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0))
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g2)))
    assert diff <= 1e-5 * max(1.0, scale), (diff, scale)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_gradcache_reuses_the_frozen_vision_features():
    """With the vision tower frozen, the gradient pass reads the embedding pass's vision features: the same loss and
    gradients as running the tower in both passes, in a program with fewer flops. A trainable tower is rerun."""
    model = U.model()
    batch, layouts = U.batch()
    g, params, frozen = train_step.split_model(model, "lora")
    assert not train_step._vision_trains(params)
    assert train_step._vision_trains(train_step.split_model(model, "full")[1])
    out, flops = {}, {}
    for cache in (False, True):
        cfg = train_step.StepConfig(objective="joint", chunk_size=2, cache_vision_features=cache)
        f = jax.jit(lambda p, fr, b, cfg=cfg:
                    train_step.loss_and_grads(g, p, fr, b, layouts, jax.random.key(0), cfg)[1:])
        compiled = f.lower(params, frozen, batch).compile()
        flops[cache] = _flops(compiled)
        out[cache] = compiled(params, frozen, batch)
    (m0, g0), (m1, g1) = out[False], out[True]
    assert abs(float(m0["loss"]) - float(m1["loss"])) <= 1e-6 * max(1.0, abs(float(m0["loss"])))
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0))
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    assert diff <= 1e-6 * max(1.0, scale), (diff, scale)
    assert flops[True] < flops[False], flops


def _one_step(mesh, objective, mode, chunk, logits_chunk=0):
    cfg = train_step.StepConfig(objective=objective, trainable=mode, chunk_size=chunk, ntp_logits_chunk=logits_chunk)
    model = build.build(U.CFG, num_btoks=U.K, lora=LORA if mode == "lora" else None, seed=3, mesh=mesh)
    graphdef, params, frozen = train_step.split_model(model, mode)
    tx, schedule = train_step.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    state = train_step.init_state(params, tx, seed=0)
    batch, layouts = U.batch(b=8, seed=1)
    batch = jax.device_put(batch, sharding.batch_shardings(batch, mesh))
    step = train_step.compile_step(graphdef=graphdef, layouts=layouts, cfg=cfg, tx=tx, schedule=schedule, state=state,
                           frozen=frozen, batch=batch, mesh=mesh)
    with jax.set_mesh(mesh), sharding.activation_sharding(mesh):  # as `btoks train` calls it
        new_state, metrics = step(state, frozen, batch)
    return new_state, metrics


@pytest.mark.parametrize("objective,mode,chunk,logits_chunk", [
    ("contrastive", "lora", 0, 0), ("gic", "lora", 0, 0), ("joint", "lora", 4, 0), ("joint", "full", 0, 0),
    ("joint", "lora", 0, 2),  # the fused loss gathers each batch shard's scored positions (4 groups here)
])
def test_mesh_step_equals_single_device_step(objective, mode, chunk, logits_chunk):
    assert jax.device_count() == 8, "the sharding tests need 8 (forced CPU) devices"
    single = sharding.make_mesh(devices=jax.devices()[:1])
    mesh = sharding.make_mesh(2, 2, 2)
    s1, m1 = _one_step(single, objective, mode, chunk, logits_chunk)
    s8, m8 = _one_step(mesh, objective, mode, chunk, logits_chunk)
    assert abs(float(m1["loss"]) - float(m8["loss"])) <= 1e-5 * max(1.0, abs(float(m1["loss"])))
    flat1 = dict(jax.tree_util.tree_flatten_with_path(s1.params)[0])
    flat8 = dict(jax.tree_util.tree_flatten_with_path(s8.params)[0])
    assert flat1.keys() == flat8.keys() and flat1
    for path, a in flat1.items():
        np.testing.assert_allclose(np.asarray(flat8[path]), np.asarray(a), rtol=0, atol=1e-5, err_msg=str(path))
    # The parameters really are sharded as the rules say.
    specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in flat8.items()}
    if mode == "lora":
        q_a = next(v for k, v in specs.items() if "layers'][0]['self_attn']['q_proj']['lora']['a'" in k)
        q_b = next(v for k, v in specs.items() if "layers'][0]['self_attn']['q_proj']['lora']['b'" in k)
        down_a = next(v for k, v in specs.items() if "['down_proj']['lora']['a'" in k)
        assert q_a == P("fsdp", None) and q_b == P(None, "tensor") and down_a == P("tensor", None)
        assert specs["['btoks'].value"] == P(None, "fsdp")
    else:
        q = next(v for k, v in specs.items() if "layers'][0]['self_attn']['q_proj']['kernel'" in k)
        emb = next(v for k, v in specs.items() if "['embed_tokens']" in k)
        assert q == P("fsdp", "tensor") and emb == P("tensor", "fsdp")
        assert len(next(x for p, x in flat8.items() if "embed_tokens" in jax.tree_util.keystr(p))
                   .addressable_shards[0].data.shape) == 2


def test_weight_decay_mask_is_the_hf_trainers():
    """AdamW decays exactly the parameters Hugging Face's Trainer decays (`get_decay_parameter_names`): all but
    biases and norm weights. Adapters (PEFT's lora_A / lora_B / lora_magnitude_vector) and the BToks (rows of
    the decayed embedding table in the authors' model) carry neither pattern, so they decay too."""
    import hf_utils as H
    from transformers import Trainer

    from btoks_jax.convert.names import hf_to_path

    hf = H.hf_model(U.CFG)
    decayed = set(Trainer.get_decay_parameter_names(None, hf))
    names = [name for name, _ in hf.named_parameters()]
    assert len(decayed) < len(names)  # biases and norms are excluded
    for name in names:
        path, _ = hf_to_path(name)
        assert train_step.decays(f"backbone.{path}.value") == (name in decayed), name
    for adapter in ("a", "b", "magnitude"):
        assert train_step.decays(f"backbone.model.layers.0.self_attn.q_proj.lora.{adapter}.value")
    assert train_step.decays("btoks.value")
    # The mask is applied leaf by leaf to the trainable state.
    model = build.build(U.CFG, num_btoks=U.K, lora=LoRAConfig(rank=4, alpha=8, dora=True), seed=0)
    _, params, _ = train_step.split_model(model, "full")
    mask = train_step.weight_decay_mask(params)
    flat = {jax.tree_util.keystr(k, simple=True, separator="."): v
            for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["backbone.model.norm.weight.value"] is False and flat["btoks.value"] is True
    assert flat["backbone.model.layers.0.mlp.down_proj.lora.magnitude.value"] is True


def test_lambda_schedule_picks_the_step_program():
    """One schedule, on the host: lambda = 5 before `ntp_until_step` (the joint program, lambda a constant in it),
    then the contrastive program (lambda 0, no vocabulary logits); GIC-only and contrastive runs never switch."""
    joint = train_step.StepConfig(objective="joint", ntp_weight=5.0, ntp_until_step=2000)
    assert train_step.config_at(joint, 0) is joint and train_step.config_at(joint, 1999) is joint
    assert train_step.config_at(joint, 2000) == dataclasses.replace(joint, objective="contrastive")
    assert train_step.config_at(dataclasses.replace(joint, ntp_until_step=None), 10**6).objective == "joint"
    gic = dataclasses.replace(joint, objective="gic")
    assert train_step.config_at(gic, 10**6) is gic
    lambdas = [float(train_step._lambda(train_step.config_at(joint, s))) for s in (0, 1999, 2000, 4999)]
    assert lambdas == [5.0, 5.0, 0.0, 0.0]
