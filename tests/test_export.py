"""Export to Hugging Face: loads cleanly, embeds as the JAX model does (model card followed literally), round-trips."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import re

import hf_utils as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import train_utils as U
import transformers
from flax import nnx
from PIL import Image

from btoks_jax import build, sharding, train_step
from btoks_jax.btoks import BToksModel
from btoks_jax.convert import hf_export
from btoks_jax.convert.hf_export import CARD_PLACEHOLDER_DIR, export_hf, hf_state_dict_keys
from btoks_jax.convert.hf_import import load_hf_weights
from btoks_jax.convert.safetensors_io import load_tensor, read_header, tensor_index
from btoks_jax.inputs import pack
from btoks_jax.lora import LoRAConfig, apply_lora
from btoks_jax.model.layers import Linear
from btoks_jax.model_config import BTOK_FIRST_ID, from_hf_config, tiny_config
from btoks_jax.processing import Processor, VideoProcessor

# One xdist worker should run the whole module, so the models of the `exports` fixture are made once (pytest 9.2 with
# xdist 3.8 ignores the group: the suffix xdist gives node ids no longer sticks, so a model may be made per worker).
pytestmark = pytest.mark.xdist_group(name="export")
TOL = 1e-4  # float32, whole model
CFG = U.CFG  # vocabulary 151700: holds the BTok ids 151657.. without resizing
LORA = LoRAConfig(rank=4, alpha=8, dropout=0.0)
# Small video frames keep the vision tower cheap; the exported video config carries these bounds to transformers.
VIDEO_PROCESSOR = VideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
TEXTS = [
    "A short caption.",
    "<|vision_start|><|image_pad|><|vision_end|>Represent the given image.\n",
    "<|vision_start|><|video_pad|><|vision_end|>Represent the given video.\n",
    "Find the video of a dog catching a red frisbee in a park.",
]
MODALITY_ROWS = {"text": [0, 3], "image": [1], "video": [2]}


# ----------------------------------------------------------------------------- models and helpers


def _single_mesh():
    return sharding.make_mesh(devices=jax.devices()[:1])


def _adapters(model):
    return [m.lora for _, m in nnx.iter_graph(model) if isinstance(m, Linear) and m.lora is not None]


def _perturb(model, seed: int):
    """Non-zero B (adapters matter) and BToks away from their <|im_end|> init, as after some training."""
    rng = np.random.default_rng(seed)
    for a in _adapters(model):
        a.b.value = a.b.value + jnp.asarray(0.05 * rng.standard_normal(a.b.shape), a.b.value.dtype)
    if model.btoks is not None:
        model.btoks.value = model.btoks.value + jnp.asarray(0.05 * rng.standard_normal(model.btoks.shape),
                                                            jnp.float32)


def _perturb_dora(model, seed: int):
    """DoRA magnitudes start as the column norms of the base kernel; move them as training would."""
    rng = np.random.default_rng(seed)
    for a in _adapters(model):
        scale = 1.0 + 0.1 * rng.standard_normal(a.magnitude.shape).astype(np.float32)
        a.magnitude.value = a.magnitude.value * jnp.asarray(scale)


def _model(num_btoks: int, seed: int, *, lora: bool = True, config=CFG, dora: bool = False):
    """A random model with LoRA (or DoRA) adapters, perturbed as after some training, on a one-device mesh."""
    model = BToksModel(config, num_btoks, rngs=nnx.Rngs(seed))
    if lora:
        apply_lora(model.backbone, dataclasses.replace(LORA, dora=dora), rngs=nnx.Rngs(seed + 1))
    _perturb(model, seed)
    if dora:
        _perturb_dora(model, seed)
    return _onto(model, _single_mesh())


def _onto(model, mesh):
    """The model with every parameter placed as the sharding rules say on `mesh`."""
    graphdef, state = nnx.split(model)
    shardings = dict(nnx.to_flat_state(sharding.state_shardings(state, mesh)))
    for path, variable in nnx.to_flat_state(state):
        variable.set_value(jax.device_put(variable.get_value(), shardings[path].get_value()))
    return nnx.merge(graphdef, state)


def _trained(seed: int):
    """A K = 4 LoRA model after 3 real optimizer steps of the joint objective."""
    model = _model(4, seed)
    before = np.asarray(model.btoks.value).copy()
    graphdef, params, frozen = train_step.split_model(model, "lora")
    tx, schedule = train_step.make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=10)
    state = train_step.init_state(params, tx, seed=0)
    batch, layouts = U.batch(b=4, seed=seed)
    step = train_step.compile_step(graphdef=graphdef, layouts=layouts, cfg=train_step.StepConfig(objective="joint"),
                                   tx=tx, schedule=schedule, state=state, frozen=frozen, batch=batch,
                                   mesh=_single_mesh())
    for _ in range(3):
        state, _ = step(state, frozen, batch)
    trained = nnx.merge(graphdef, state.params, frozen)
    assert np.abs(np.asarray(trained.btoks.value) - before).max() > 1e-3  # the steps did move the parameters
    return trained


def _dora(seed: int):
    return _model(4, seed, dora=True)



@pytest.fixture(scope="module")
def media():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (56, 84, 3), np.uint8))
    video = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), np.uint8)) for _ in range(4)]
    return [image], [video]


MODELS = {"lora_k4": lambda: _trained(1), "lora_k0": lambda: _model(0, 2), "dora_k4": lambda: _dora(3)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    """name -> (model, exported directory); each model is made and exported once per module, when first asked."""
    cache = {}

    def get(name):
        if name not in cache:
            model = MODELS[name]()
            out = export_hf(model, tmp_path_factory.mktemp(name) / "hf", tokenizer=tokenizer,
                            video_processor=VIDEO_PROCESSOR, progress=False, source_note=f"tests/test_export.py {name}")
            cache[name] = model, out
        return cache[name]

    return get


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _load_hf(directory: str):
    """from_pretrained with its loading report checked: no missing / unexpected / mismatched keys, no warnings."""
    handler = _Records()
    logger = logging.getLogger("transformers")  # transformers' root logger does not propagate
    logger.addHandler(handler)
    try:
        model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info.values()), info
    warnings = [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings
    return model.eval()


def test_loading_report_is_captured(exports, tmp_path):
    """The check of `_load_hf` can fail: a checkpoint with a key renamed gives a report and a warning."""
    _, out = exports("lora_k0")
    broken = tmp_path / "broken"
    os.makedirs(broken)
    for f in os.listdir(out):
        if not f.endswith(".safetensors"):
            os.symlink(os.path.join(out, f), broken / f)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(out, "model.safetensors"))
    tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AssertionError, match="norm"):
        _load_hf(str(broken))


def _card_embed(directory: str):
    """`embed` from the model card's first python block, run as written with `model_dir` pointing here.

    Without torchvision, transformers' `AutoProcessor` cannot build its video processor; the block then gets
    btoks_jax's `Processor`, whose outputs equal `Qwen2VLProcessor`'s (tests/test_processing.py).
    """
    with open(os.path.join(directory, "README.md"), encoding="utf-8") as f:
        code = re.search(r"```python\n(.*?)```", f.read(), re.DOTALL).group(1)
    assert f'model_dir = "{CARD_PLACEHOLDER_DIR}"' in code
    code = code.replace(CARD_PLACEHOLDER_DIR, directory)
    namespace = {}
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("torchvision") is None:
            mp.setattr(transformers.AutoProcessor, "from_pretrained", _NumpyProcessorAsTorch.from_pretrained)
        exec(compile(code, os.path.join(directory, "README.md"), "exec"), namespace)  # noqa: S102 (the card's code)
    return namespace["embed"], namespace["model"]


class _NumpyProcessorAsTorch:
    def __init__(self, processor: Processor):
        self.processor = processor

    @classmethod
    def from_pretrained(cls, directory):
        return cls(Processor.from_pretrained(directory))

    def __call__(self, text, images=None, videos=None, return_tensors=None, **kwargs):
        assert return_tensors == "pt"
        return {k: torch.from_numpy(v) for k, v in self.processor(text, images=images, videos=videos, **kwargs).items()}


@functools.partial(jax.jit, static_argnames=("layout", "pooling"))
def _embed_jit(model, inputs, layout, pooling):
    return model(inputs, layout, pooling=pooling)[0]


def _jax_embed(model, directory: str, texts, images, videos):
    """BToksModel + pack + pool on what btoks_jax's processor makes of the same inputs (no BTok text)."""
    hf_batch = Processor.from_pretrained(directory)(texts, images=images, videos=videos)
    packed = pack(hf_batch, model.config, num_btoks=model.num_btoks)
    return np.asarray(_embed_jit(model, packed.inputs, packed.layout, "btoks" if model.num_btoks else "last"))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(MODELS))
def test_export_loads_in_transformers(exports, name):
    model, out = exports(name)
    k = model.num_btoks
    hf = _load_hf(out)
    tied = CFG.tie_word_embeddings
    assert hf.config.tie_word_embeddings == tied and hf.config.text_config.vocab_size == CFG.text_config.vocab_size
    assert from_hf_config(out) == CFG
    transformers.GenerationConfig.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    names = [f"<|btok_{i}|>" for i in range(k)]
    ids = list(range(BTOK_FIRST_ID, BTOK_FIRST_ID + k))
    assert tok.convert_tokens_to_ids(names) == ids
    if k:
        assert tok("a cat" + "".join(names))["input_ids"][-k:] == ids
        assert all(tok.added_tokens_decoder[i].special for i in ids)
        rows = hf.model.language_model.embed_tokens.weight.detach().numpy()[ids]
        assert np.array_equal(rows, np.asarray(model.btoks.value))  # the BTok vectors, bit for bit (float32)
    else:
        assert tok.convert_tokens_to_ids("<|btok_0|>") in (None, tok.unk_token_id)
    header = read_header(os.path.join(out, "model.safetensors"))
    assert sorted(header) == sorted(hf_state_dict_keys(CFG))
    assert {e["dtype"] for e in header.values()} == {"F32"}
    # The adapters are merged: the exported projection is not the base kernel.
    base = np.asarray(model.backbone.model.layers[0].self_attn.q_proj.kernel.value).T
    merged = hf.model.language_model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(merged - base).max() > 1e-2


@pytest.mark.parametrize("name", list(MODELS))
def test_card_embeddings_equal_jax(exports, media, name):
    """The model card's recipe in PyTorch equals BToksModel + pack + pool (LoRA / DoRA still unmerged in JAX)."""
    model, out = exports(name)
    images, videos = media
    embed, _ = _card_embed(out)
    ref = embed(TEXTS, images=images, videos=videos).numpy()
    emb = _jax_embed(model, out, TEXTS, images, videos)
    diffs = {m: float(np.abs(emb[rows] - ref[rows]).max()) for m, rows in MODALITY_ROWS.items()}
    print(f"{name}: max |jax - card| per modality {diffs}")
    assert max(diffs.values()) <= TOL, diffs
    # Not trivially equal: the rows differ from each other.
    assert np.abs(ref[0] - ref[3]).max() > 1e-2


def test_import_back_reads_btok_rows(exports, media):
    model, out = exports("lora_k4")
    again = build.build(from_hf_config(out), num_btoks=model.num_btoks, hf_dir=out, mesh=_single_mesh(),
                        progress=False)
    assert np.array_equal(np.asarray(again.btoks.value), np.asarray(model.btoks.value))
    images, videos = media
    a = _jax_embed(again, out, TEXTS, images, videos)
    b = _jax_embed(model, out, TEXTS, images, videos)
    print(f"import-back: max diff {float(np.abs(a - b).max())}")
    assert np.abs(a - b).max() <= TOL


def _assert_same_tensors(dir_a: str, dir_b: str):
    """Same keys, dtypes, shapes and bytes (file layout and metadata may differ)."""
    a, b = tensor_index(dir_a), tensor_index(dir_b)
    assert sorted(a) == sorted(b)
    for key in a:
        ea, eb = a[key][1], b[key][1]
        assert (ea["dtype"], ea["shape"]) == (eb["dtype"], eb["shape"]), key
        assert load_tensor(a[key][0], key).tobytes() == load_tensor(b[key][0], key).tobytes(), key


def _import(src: str, param_dtype: str, mesh):
    """A Hugging Face directory as a BToksModel (K = 0, no adapters) through `load_hf_weights`, on `mesh`."""
    cfg = from_hf_config(src, param_dtype=param_dtype)
    backbone, _ = load_hf_weights(src, cfg, progress=False)
    return _onto(BToksModel(cfg, 0, rngs=nnx.Rngs(0), backbone=backbone), mesh)


@pytest.mark.parametrize("tied,param_dtype", [(True, "float32"), (False, "bfloat16")])
def test_hf_round_trip_is_bit_identical(tmp_path, tokenizer, tied, param_dtype):
    """HF -> btoks-jax -> HF, float32 and bfloat16 checkpoints; the tied one imported onto a 2x2x2 mesh."""
    cfg = tiny_config(vocab_size=2000, tie_word_embeddings=tied)
    hf = H.hf_model(cfg, seed=4)
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        src = str(tmp_path / f"src_{dtype}")
        hf.to(torch_dtype).save_pretrained(src)
        mesh = sharding.make_mesh(2, 2, 2) if tied else _single_mesh()
        # A float32 checkpoint is held in float32; a bfloat16 one in `param_dtype` (either is lossless for it).
        model = _import(src, param_dtype if dtype == "bfloat16" else "float32", mesh)
        if tied:  # the export gathers tensors that really are split over devices
            table = model.backbone.model.embed_tokens.value
            assert table.addressable_shards[0].data.size < table.size
        out = export_hf(model, tmp_path / f"out_{dtype}", tokenizer=tokenizer, dtype=dtype, progress=False)
        _assert_same_tensors(src, out)
        keys = sorted(tensor_index(out))
        assert keys == sorted(hf_state_dict_keys(cfg))
        assert ("lm_head.weight" in keys) == (not tied)
        with open(os.path.join(out, "config.json")) as f:
            written = json.load(f)
        assert written["tie_word_embeddings"] == tied and written["dtype"] == dtype
        assert transformers.AutoConfig.from_pretrained(out).tie_word_embeddings == tied


@pytest.mark.parametrize("tied", [True, False])
def test_vocabulary_grows_for_btok_ids(tmp_path, tokenizer, tied):
    """A vocabulary without room for the BTok ids is resized (new rows: the mean row); a tied head stays tied."""
    model = _model(4, 5, lora=False, config=tiny_config(vocab_size=151650, tie_word_embeddings=tied))
    out = export_hf(model, tmp_path / "hf", tokenizer=tokenizer, progress=False)
    hf = _load_hf(out)
    assert hf.config.text_config.vocab_size == BTOK_FIRST_ID + 4 and hf.config.tie_word_embeddings == tied
    table = hf.model.language_model.embed_tokens.weight.detach().numpy()
    ids = list(range(BTOK_FIRST_ID, BTOK_FIRST_ID + 4))
    old = np.asarray(model.backbone.model.embed_tokens.value)
    assert np.array_equal(table[:151650], old) and np.array_equal(table[ids], np.asarray(model.btoks.value))
    assert np.allclose(table[151650:BTOK_FIRST_ID], old.mean(0), atol=1e-6)
    keys = sorted(tensor_index(out))
    assert ("lm_head.weight" in keys) == (not tied)
    if not tied:
        head = hf.lm_head.weight.detach().numpy()
        kernel = np.asarray(model.backbone.lm_head.kernel.value)
        assert head.shape == table.shape and np.array_equal(head[:151650], kernel.T)
        assert np.allclose(head[151650:], kernel.T.mean(0), atol=1e-6)
        # The card still embeds as the JAX model does (text only: the vision path is covered above).
        embed, _ = _card_embed(out)
        texts = [TEXTS[0], TEXTS[3]]
        diff = float(np.abs(embed(texts).numpy() - _jax_embed(model, out, texts, None, None)).max())
        print(f"resized vocabulary: max |jax - card| {diff}")
        assert diff <= TOL


def test_sharded_export_with_index(exports, tmp_path, tokenizer):
    model, out = exports("lora_k4")
    limit = 200_000  # bytes; the 29 MB embedding gets a shard of its own, the rest spreads over several
    sharded = export_hf(model, tmp_path / "sharded", tokenizer=tokenizer, video_processor=VIDEO_PROCESSOR,
                        max_shard_size=limit, progress=False)
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not os.path.exists(os.path.join(sharded, "model.safetensors"))
    assert sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors")) == files
    assert sorted(index["weight_map"]) == sorted(hf_state_dict_keys(CFG))
    total = 0
    for f in files:
        header = read_header(os.path.join(sharded, f))
        assert {k for k, v in index["weight_map"].items() if v == f} == set(header)
        size = sum(load_tensor(os.path.join(sharded, f), k).nbytes for k in header)  # the data section
        assert size <= limit or len(header) == 1, (f, size)
        total += size
    assert index["metadata"]["total_size"] == total
    _assert_same_tensors(out, sharded)
    _load_hf(sharded)


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_precision_rounds_as_torch(exports, tmp_path, tokenizer, dtype, torch_dtype):
    """A bfloat16 / float16 export equals the float32 export (adapters merged) cast by torch, bit for bit."""
    model, out = exports("lora_k4")
    half = export_hf(model, tmp_path / dtype, tokenizer=tokenizer, dtype=dtype, progress=False)
    full, low = tensor_index(out), tensor_index(half)
    assert sorted(full) == sorted(low)
    for key in full:
        ref = torch.from_numpy(np.array(load_tensor(full[key][0], key))).to(torch_dtype)
        assert low[key][1]["dtype"] == {"bfloat16": "BF16", "float16": "F16"}[dtype]
        assert load_tensor(low[key][0], key).tobytes() == ref.view(torch.int16).numpy().tobytes(), key
    with open(os.path.join(half, "config.json")) as f:
        assert json.load(f)["dtype"] == dtype


def test_refuses_non_empty_dir_and_leaves_nothing_on_failure(tmp_path, tokenizer, monkeypatch):
    model = _model(0, 6, lora=False, config=tiny_config(vocab_size=512))
    out = tmp_path / "hf"
    os.makedirs(out)
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError):
        export_hf(model, out, tokenizer=tokenizer, progress=False)
    assert os.listdir(out) == ["keep.txt"]

    calls = {"n": 0}
    to_host = hf_export._to_host

    def failing(value, dtype):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("injected failure")
        return to_host(value, dtype)

    monkeypatch.setattr(hf_export, "_to_host", failing)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="injected"):
        export_hf(model, fresh, tokenizer=tokenizer, progress=False)
    assert not fresh.exists()
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="injected"):
        export_hf(model, out, tokenizer=tokenizer, progress=False, overwrite=True)
    assert os.listdir(out) == ["keep.txt"]  # the old directory is untouched
    assert os.listdir(tmp_path) == ["hf"]  # and no partial directory is left beside it

    monkeypatch.setattr(hf_export, "_to_host", to_host)
    export_hf(model, out, tokenizer=tokenizer, progress=False, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_pooling_head_travels_with_the_export(tmp_path, tokenizer, media):
    """A v2 model (learned attention pooling) exports its head beside the weights; `from_pretrained` brings it
    back, so the exported directory embeds as the trained model does."""
    from btoks_jax.api import from_pretrained
    from btoks_jax.convert.hf_export import HEAD_CONFIG, HEAD_WEIGHTS
    from btoks_jax.head import AttentionPoolingConfig

    model = BToksModel(CFG, 4, rngs=nnx.Rngs(7), head=AttentionPoolingConfig(mlp_ratio=2.0, dropout=0.1))
    _perturb(model, 7)
    model = _onto(model, _single_mesh())
    model.eval()
    out = export_hf(model, tmp_path / "hf", tokenizer=tokenizer, video_processor=VIDEO_PROCESSOR, progress=False)
    assert os.path.exists(os.path.join(out, HEAD_WEIGHTS)) and os.path.exists(os.path.join(out, HEAD_CONFIG))
    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        assert "pooling head" in f.read()
    loaded = from_pretrained(out, shard=False)
    assert loaded.model.head is not None and loaded.model.head.cfg.mlp_ratio == 2.0
    texts = ["a cat on a mat", "<|vision_start|><|image_pad|><|vision_end|>a photo"]
    images, _ = media
    ref = _jax_embed(model, out, texts, images, None)
    got = _jax_embed(loaded.model, out, texts, images, None)
    assert np.abs(got - ref).max() <= 1e-5
    mean_pooled = _jax_embed(_onto(BToksModel(CFG, 4, rngs=nnx.Rngs(0), backbone=model.backbone), _single_mesh()),
                             out, texts, images, None)
    assert np.abs(mean_pooled - ref).max() > 1e-3  # the head is what pools, not the mean
