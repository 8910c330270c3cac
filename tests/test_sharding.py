"""The rules table is the only source of shardings: unknown logical names and indivisible dimensions fail."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from btoks_jax import build, sharding
from btoks_jax.model.layers import param
from btoks_jax.model_config import tiny_config


class _Misspelt(nnx.Module):
    def __init__(self):
        self.kernel = param(nnx.Rngs(0), nnx.initializers.zeros, (8, 4), jnp.float32, ("embd", None))


def test_unknown_logical_axis_raises():
    assert jax.device_count() == 8, "tests/conftest.py must force 8 CPU devices"
    _, state = nnx.split(nnx.eval_shape(_Misspelt))
    with pytest.raises(ValueError, match=r"kernel.*unknown logical axis name 'embd'.*batch, embed, "):
        sharding.state_shardings(state, sharding.make_mesh(2, 2, 2))
    with pytest.raises(ValueError, match="unknown logical axis name 'heads'"):
        sharding.logical_to_spec(("batch", "heads"), (8, 4), sharding.make_mesh(2, 2, 2))


def test_indivisible_dimension_raises():
    """A vocabulary of 151700 rows does not split 8 ways over `tensor`: an error, not a replicated table."""
    _, state = nnx.split(build.abstract(tiny_config(vocab_size=151700), 4, None))
    with pytest.raises(ValueError, match=r"backbone\.model\.embed_tokens.* of shape \(151700, 48\): dimension "
                                         r"151700 \(logical axis 'vocab'\).*\('tensor',\) of sizes \(8,\)"):
        sharding.state_shardings(state, sharding.make_mesh(1, 1, 8))
    # The same model places on the meshes it divides; a mesh axis of size 1 is named and splits nothing.
    flat = dict(nnx.to_flat_state(sharding.state_shardings(state, sharding.make_mesh(1, 2, 4))))
    assert flat[("backbone", "model", "embed_tokens")].get_value().spec == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("batch", "seq", "embed"), (8, 5, 48), sharding.make_mesh(4, 1, 2)) == \
        P(("data", "fsdp"), None, None)  # `fsdp` is the batch's already, so `embed` stays whole


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Inputs:  # the `positions` field as the packed model inputs carry it
    positions: np.ndarray


def test_batch_shardings_from_the_batch_rule():
    mesh = sharding.make_mesh(2, 2, 2)
    batch = {"labels": np.zeros((8, 5), np.int32), "inputs": _Inputs(np.zeros((3, 8, 5), np.int32))}
    sh = sharding.batch_shardings(batch, mesh)
    assert sh["labels"].spec == P(("data", "fsdp"), None)
    assert sh["inputs"].positions.spec == P(None, ("data", "fsdp"), None)  # int[3, B, T]: the batch on axis 1
    assert sharding.batch_shardings(batch, mesh, sharding.RULE_SETS["replicated"])["labels"] == sh["labels"]
    with pytest.raises(ValueError, match=r"labels of shape \(6, 5\): dimension 6 \(logical axis 'batch'\)"):
        sharding.batch_shardings({"labels": np.zeros((6, 5), np.int32)}, mesh)


def test_current_spec_follows_the_active_rules():
    """What per-shard code (the splash kernel's shard_map) gets: the mesh of `jax.set_mesh`, the rules of
    `activation_sharding`."""
    assert sharding.current_spec(("batch", None), (8, 5)) is None and sharding.current_shards("q_heads") == 1
    mesh = sharding.make_mesh(2, 1, 4)
    with jax.set_mesh(mesh):
        assert sharding.current_spec(("batch", None, "q_heads", None), (8, 5, 4, 2)) == P(("data", "fsdp"), None,
                                                                                     "tensor", None)
        assert sharding.current_shards("q_heads") == 4
        with sharding.activation_sharding(mesh, sharding.RULE_SETS["replicated"]):
            assert sharding.current_shards("q_heads") == 1
            assert sharding.current_spec(("batch", None, "q_heads", None), (8, 5, 4, 2)) == P(("data", "fsdp"),
                                                                                         None, None, None)
