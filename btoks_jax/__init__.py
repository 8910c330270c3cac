"""btoks-jax: Bottleneck Tokens for unified multimodal retrieval, in JAX/Flax on Qwen2-VL."""

__version__ = "0.1.0"


def from_pretrained(directory, **kwargs):
    """Loads a model with its tokenizer and processor settings; see `btoks_jax.api.from_pretrained`."""
    from btoks_jax.api import from_pretrained as _from_pretrained

    return _from_pretrained(directory, **kwargs)


__all__ = ["from_pretrained", "__version__"]
