"""Test set-up: 8 forced CPU devices and float32 'highest' matmuls, before jax is imported; shared fixtures."""

import json
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def tokenizer():
    """The packaged Qwen2 tokenizer with the BTok tokens, one per test module."""
    from btoks_jax.processing import load_tokenizer

    return load_tokenizer()


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows) -> path: one JSON object a line, UTF-8."""

    def write(path, rows):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return path

    return write
