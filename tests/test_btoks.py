"""BToks against the authors' formulation: two-pass equivalence, embeddings, the severed path, losses."""

from __future__ import annotations

import hf_utils as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from btoks_jax import losses
from btoks_jax.btoks import BToksModel, pool
from btoks_jax.convert.hf_import import load_hf_weights
from btoks_jax.inputs import pack
from btoks_jax.mask import Layout, block_skip_fraction, static_mask
from btoks_jax.model_config import BTOK_FIRST_ID, IM_END_ID, IM_START_ID, tiny_config

TOL = 1e-4
CFG = tiny_config()
K = 4
PATCH_DIM = CFG.vision_config.patch_dim
PREFIX = [IM_START_ID, 77091, 198]  # "<|im_start|>", "assistant", "\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same random weights as a PyTorch model with BTok vocabulary rows and as a BToksModel."""
    hf = H.hf_model(CFG, seed=5)
    d = str(tmp_path_factory.mktemp("btoks"))
    hf.save_pretrained(d)
    backbone, _ = load_hf_weights(d, progress=False)
    model = BToksModel(CFG, K, rngs=nnx.Rngs(0), backbone=backbone)
    btoks = np.random.default_rng(0).standard_normal((K, CFG.text_config.hidden_size)).astype(np.float32) * 0.05
    model.btoks.value = jnp.asarray(btoks)
    with torch.no_grad():
        hf.model.language_model.embed_tokens.weight[BTOK_FIRST_ID:BTOK_FIRST_ID + K] = torch.from_numpy(btoks)
    return hf, model


BTOK_IDS = list(range(BTOK_FIRST_ID, BTOK_FIRST_ID + K))


def _image_query():
    row = [101, 102, *H.image_tokens((1, 4, 6)), 103, 104]
    batch = H.make_batch([row])
    batch["image_grid_thw"] = np.array([(1, 4, 6)])
    batch["pixel_values"] = H.random_pixels([(1, 4, 6)], PATCH_DIM, 7)
    return batch


def _target(body):
    return PREFIX + body + [IM_END_ID], len(PREFIX)


def _hf_two_pass(hf, query_batch, target_ids, k=K):
    """The authors' formulation: encode [Q ; B] with a cache, keep only the BTok entries of every
    layer, then run the target against that K-entry cache at positions offset by |[Q ; B]|. With
    k = 0 (no BToks) the last input token's entry is kept: a one-token bottleneck."""
    btok_ids = BTOK_IDS[:k]
    keep = k or 1
    ids = np.concatenate([query_batch["input_ids"], [btok_ids]], 1).astype(np.int64)
    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in query_batch.items() if k not in ("input_ids",)}
    kw["attention_mask"] = torch.ones(ids.shape, dtype=torch.long)
    kw["mm_token_type_ids"] = torch.from_numpy(np.concatenate([query_batch["mm_token_type_ids"],
                                                               np.zeros((1, k), np.int64)], 1))
    from transformers import DynamicCache

    with torch.no_grad():
        out = hf.model(input_ids=torch.from_numpy(ids), use_cache=True, **kw)
        full = out.past_key_values if hasattr(out, "past_key_values") and out.past_key_values is not None \
            else out.cache
        kept = DynamicCache()
        for i, layer in enumerate(full.layers):
            kept.update(layer.keys[:, :, -keep:].clone(), layer.values[:, :, -keep:].clone(), i)
        n = len(target_ids)
        offset = ids.shape[1]
        pos = torch.arange(n).view(1, 1, n).expand(3, 1, n) + offset
        t_out = hf.model.language_model(input_ids=torch.tensor([target_ids]), position_ids=pos, cache=kept,
                                        use_cache=True)
        logits = hf.lm_head(t_out.last_hidden_state)
    return logits[0].numpy(), out.last_hidden_state[0, -keep:].numpy()


def test_single_masked_pass_equals_authors_two_pass(models):
    hf, model = models
    query = _image_query()
    target = _target([1000, 2000, 3000, 4000, 5])
    packed = pack(query, CFG, num_btoks=K, targets=[target], target_len=12)
    emb, logits = jax.jit(lambda m, x: m(x, packed.layout, target_logits=True))(model, packed.inputs)
    ref_logits, ref_btok_hidden = _hf_two_pass(hf, query, target[0])
    n = len(target[0])
    assert np.abs(np.asarray(logits)[0, :n] - ref_logits).max() <= TOL
    # NTP loss on the scored tokens: the JAX loss equals the cross-entropy of the PyTorch logits.
    loss, per_sample = losses.ntp_loss(logits, packed.labels, packed.label_mask)
    lab = np.asarray(target[0][1:])
    scored = np.arange(1, n) >= len(PREFIX)
    ref_nll = torch.nn.functional.cross_entropy(torch.from_numpy(ref_logits[:-1][scored]),
                                                torch.from_numpy(lab[scored]))
    assert abs(float(loss) - float(ref_nll)) <= TOL
    assert packed.label_mask.sum() == len(target[0]) - len(PREFIX)  # text tokens + <|im_end|>
    ref_emb = ref_btok_hidden.mean(0)
    assert np.abs(np.asarray(emb)[0] - ref_emb / np.linalg.norm(ref_emb)).max() <= TOL


def test_no_btoks_gic_uses_the_last_token_as_bottleneck(models):
    """K = 0 with the generative loss: the target reads the last input token's cache entry only, as the
    authors' two-pass code does for the "no BToks" ablation; the embedding is last-token pooling."""
    hf, model = models
    no_btoks = BToksModel(CFG, 0, rngs=nnx.Rngs(0), backbone=model.backbone)
    query = _image_query()
    target = _target([1000, 2000, 3000, 4000, 5])
    packed = pack(query, CFG, num_btoks=0, targets=[target], target_len=12)
    emb, logits = jax.jit(lambda m, x: m(x, packed.layout, pooling="last", target_logits=True))(no_btoks,
                                                                                               packed.inputs)
    ref_logits, ref_last = _hf_two_pass(hf, query, target[0], k=0)
    n = len(target[0])
    # The fixture's PyTorch model holds the BTok vectors in its tied <|btok_i|> rows; a K = 0 model has none,
    # so those K output columns differ by construction and every other column must agree.
    others = np.setdiff1d(np.arange(CFG.text_config.vocab_size), BTOK_IDS)
    assert np.abs(np.asarray(logits)[0, :n][:, others] - ref_logits[:, others]).max() <= TOL
    assert np.abs(np.asarray(emb)[0] - ref_last[0] / np.linalg.norm(ref_last[0])).max() <= TOL
    # The target sees exactly one input column, the last one, and nothing else of Q.
    m = static_mask(packed.layout)
    t_rows = m[packed.layout.target_slice, : packed.layout.query_len]
    assert t_rows[:, -1].all() and not t_rows[:, :-1].any()


def _hf_btok_embedding(hf, batch):
    """Mean of the HF hidden states at the <|btok_i|> rows appended after each row's last real token."""
    rows = []
    for ids, m in zip(batch["input_ids"], batch["attention_mask"]):
        rows.append(list(ids[m.astype(bool)]) + BTOK_IDS)
    padded = H.make_batch(rows, "right")
    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in padded.items()}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in batch:
            kw[key] = torch.from_numpy(np.asarray(batch[key]))
    with torch.no_grad():
        hidden = hf.model(**kw).last_hidden_state.numpy()
    out = []
    for i, r in enumerate(rows):
        v = hidden[i, len(r) - K:len(r)].mean(0)
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


@pytest.mark.parametrize("case", ["text", "image", "video", "padded_batch_left", "padded_batch_right"])
def test_btok_embedding_equals_hf_vocab_rows(models, case):
    hf, model = models
    side = "right" if case == "padded_batch_right" else "left"
    grids_i, grids_v = [], []
    if case == "text":
        rows = [[9707, 1879, 11, 220, 108386]]
    elif case == "image":
        rows, grids_i = [[5, *H.image_tokens((1, 4, 6)), 6, 7]], [(1, 4, 6)]
    elif case == "video":
        rows, grids_v = [[5, *H.image_tokens((2, 4, 4), video=True), 6]], [(2, 4, 4)]
    else:
        rows = [[1, 2, 3], [4, *H.image_tokens((1, 4, 2)), 5, 6, 7, 8], [9, *H.image_tokens((1, 2, 2)), 10]]
        grids_i = [(1, 4, 2), (1, 2, 2)]
    batch = H.make_batch(rows, side)
    if grids_i:
        batch["image_grid_thw"] = np.array(grids_i)
        batch["pixel_values"] = H.random_pixels(grids_i, PATCH_DIM, 1)
    if grids_v:
        batch["video_grid_thw"] = np.array(grids_v)
        batch["pixel_values_videos"] = H.random_pixels(grids_v, PATCH_DIM, 2)
    packed = pack(batch, CFG, num_btoks=K, query_len=16)
    emb, _ = jax.jit(lambda m, x: m(x, packed.layout))(model, packed.inputs)
    ref = _hf_btok_embedding(hf, batch)
    assert np.abs(np.asarray(emb) - ref).max() <= TOL


def _ntp_from_query_embeds(model, packed, mode):
    def loss_fn(q_embeds):
        bb = model.backbone
        embeds = bb.embed_inputs(packed.inputs)
        lay = packed.layout
        embeds = embeds.at[:, :lay.query_len].set(q_embeds)
        embeds = embeds.at[:, lay.btok_slice].set(model.btoks.value[None])
        hidden = bb.decode(embeds, packed.inputs, static_mask(lay, mode))
        logits = bb.logits(hidden[:, lay.target_slice])
        return losses.ntp_loss(logits, packed.labels, packed.label_mask)[0]

    q0 = model.backbone.embed_inputs(packed.inputs)[:, :packed.layout.query_len]
    return jax.grad(loss_fn)(q0)


def test_severed_path_is_really_severed(models):
    _, model = models
    query = H.make_batch([[11, 12, 13, 14, 15, 16]])
    packed = pack(query, CFG, num_btoks=K, targets=[_target([21, 22, 23])], target_len=8)
    g_isolated = _ntp_from_query_embeds(model, packed, "isolated")
    g_condensed = _ntp_from_query_embeds(model, packed, "condensation")
    g_full = _ntp_from_query_embeds(model, packed, "full")
    assert np.all(np.asarray(g_isolated) == 0.0)
    assert np.abs(np.asarray(g_condensed)).max() > 1e-6  # reaches the query only through the BToks
    assert np.abs(np.asarray(g_full)).max() > 1e-6


def test_full_mode_equals_plain_causal_forward(models):
    hf, model = models
    query = _image_query()
    target = _target([31, 32, 33])
    packed = pack(query, CFG, num_btoks=K, targets=[target], target_len=len(target[0]))
    _, logits = jax.jit(lambda m, x: m(x, packed.layout, mask_mode="full", target_logits=True))(model, packed.inputs)
    ids = np.concatenate([query["input_ids"][0], BTOK_IDS, target[0]])[None]
    with torch.no_grad():
        out = hf.model(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(
            np.asarray(packed.inputs.positions, np.int64)), pixel_values=torch.from_numpy(query["pixel_values"]),
            image_grid_thw=torch.from_numpy(query["image_grid_thw"]))
        ref = hf.lm_head(out.last_hidden_state)[0, -len(target[0]):].numpy()
    assert np.abs(np.asarray(logits)[0] - ref).max() <= TOL


def test_pooling_last_is_eos_pooling(models):
    _, model = models
    batch = H.make_batch([[1, 2, 3, 4], [5, 6]], "right")
    packed = pack(batch, CFG, num_btoks=0, query_len=6)
    bb_model = BToksModel(CFG, 0, rngs=nnx.Rngs(0), backbone=model.backbone)
    emb, _ = bb_model(packed.inputs, packed.layout, pooling="last")
    hidden, _ = model.backbone(packed.inputs)
    ref = np.asarray(hidden)[:, -1]
    ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
    assert np.abs(np.asarray(emb) - ref).max() <= 1e-5
    with pytest.raises(ValueError, match="num_btoks > 0"):
        pool(hidden, packed.layout, "btoks")


# The splash kernel interprets slowly on CPU: one mask and one start for it.
@pytest.mark.parametrize("attention_impl,mode,remat", [("dense", "condensation", False), ("dense", "full", True),
                                                       ("splash", "condensation", True)])
def test_the_last_layer_computes_only_the_columns_read(attention_impl, mode, remat):
    """`forward(start=s)` is `forward()[:, s:]`, values and gradients: the earlier columns enter the last layer
    only through its keys and values. With `read_start` the step reads the BToks and the target region."""
    from btoks_jax.btoks import read_start

    cfg = tiny_config(attention_impl=attention_impl, remat=remat)
    model = BToksModel(cfg, K, rngs=nnx.Rngs(3))
    batch = H.make_batch([[11, 12, 13, 14, 15, 16, 17], [21, 22, 23]], "left")
    targets = [_target([1000, 2000, 3000]), _target([4000])]
    packed = pack(batch, cfg, num_btoks=K, query_len=8, targets=targets, target_len=8)
    layout = packed.layout
    assert read_start(layout) == 8 and read_start(layout, "last") == 11
    graphdef, state = nnx.split(model)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((2, layout.length, CFG.text_config.hidden_size)),
                          jnp.float32)

    starts = (read_start(layout), read_start(layout, "last"), layout.target_slice.start, 1)
    for start in starts if attention_impl == "dense" else starts[:1]:
        def loss(st, start=start):
            hidden = nnx.merge(graphdef, st).forward(packed.inputs, layout, mask_mode=mode, start=start)
            return jnp.sum(hidden * weights[:, start:]), hidden

        def full(st, start=start):
            hidden = nnx.merge(graphdef, st).forward(packed.inputs, layout, mask_mode=mode)[:, start:]
            return jnp.sum(hidden * weights[:, start:]), hidden

        (_, got), g_got = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        (_, want), g_want = jax.jit(jax.value_and_grad(full, has_aux=True))(state)
        assert got.shape == (2, layout.length - start, cfg.text_config.hidden_size)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want)):
            # float32 sums in another order: differences at 1e-7 of the gradient's largest entry
            assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max(), jax.tree_util.keystr(path)
    with pytest.raises(ValueError, match="not a column"):
        model.forward(packed.inputs, layout, start=layout.length)


def _np_info_nce(q, p, tau, symmetric=False):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)

    def ce(a, b):
        logits = a @ b.T / tau
        logits = logits - logits.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits)))

    return 0.5 * (ce(q, p) + ce(p, q)) if symmetric else ce(q, p)


def test_info_nce_matches_numpy_and_is_sharding_invariant():
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    q = rng.standard_normal((16, 24)).astype(np.float32)
    p = rng.standard_normal((16, 24)).astype(np.float32)
    assert abs(float(losses.info_nce(q, p)) - _np_info_nce(q, p, 0.02)) <= 1e-5 * max(1, _np_info_nce(q, p, 0.02))
    assert abs(float(losses.info_nce(q, p, symmetric=True)) - _np_info_nce(q, p, 0.02, True)) <= 1e-4
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    qs, ps = jax.device_put(q, sharding), jax.device_put(p, sharding)
    assert len(qs.sharding.device_set) == 8
    sharded = jax.jit(losses.info_nce)(qs, ps)
    assert abs(float(sharded) - float(losses.info_nce(q, p))) <= 1e-6
    # Hard negatives extend every query's candidate set.
    hn = rng.standard_normal((16, 2, 24)).astype(np.float32)
    with_hn = float(losses.info_nce(q, p, hard_negatives=hn))
    cand = np.concatenate([p, hn.reshape(-1, 24)])
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cn = cand / np.linalg.norm(cand, axis=1, keepdims=True)
    logits = qn @ cn.T / 0.02
    ref = np.mean(np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1) - logits[np.arange(16),
                                                                                                          np.arange(16)])
    assert abs(with_hn - ref) <= 1e-4


def test_ntp_reductions():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((16, 5, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (16, 5))
    mask = rng.random((16, 5)) < 0.6
    mask[3] = False  # a sample that does not generate
    nll = -np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
    nll = np.take_along_axis(nll, labels[..., None], -1)[..., 0] * mask
    per = nll.sum(1) / np.maximum(mask.sum(1), 1)
    gen = mask.sum(1) > 0
    loss, _ = losses.ntp_loss(logits, labels, mask)
    assert abs(float(loss) - per[gen].mean()) <= 1e-5
    chunk, _ = losses.ntp_loss(logits, labels, mask, reduction="chunk_token_mean", chunk_size=8)
    ref = sum(nll[c:c + 8].sum() / mask[c:c + 8].sum() * gen[c:c + 8].sum() for c in (0, 8)) / 16
    assert abs(float(chunk) - ref) <= 1e-5
    assert float(losses.ntp_weight(1999, until_step=2000)) == 5.0
    assert float(losses.ntp_weight(2000, until_step=2000)) == 0.0
    assert float(losses.ntp_weight(10**6)) == 5.0


def test_mask_layout_and_block_skipping():
    lay = Layout(query_len=6, num_btoks=2, target_len=4)
    m = static_mask(lay, "condensation")
    assert not m[8:, :6].any() and m[8:, 6:8].all() and m[6:8, :6].all() and not m[:8, 8:].any()
    assert np.array_equal(static_mask(lay, "full"), np.tri(12, dtype=bool))
    big = Layout(query_len=1020, num_btoks=4, target_len=512)  # L = 1536 = 3 blocks of 512
    # Causal alone skips the 3 upper tiles of 9; the cut adds the tile where the last block of rows (all
    # target) meets the first block of columns (all query). The second column block holds the BToks.
    assert block_skip_fraction(big, "full") == pytest.approx(3 / 9)
    assert block_skip_fraction(big, "condensation") == pytest.approx(4 / 9)
    # BTok rows in the last row block keep its query tiles alive.
    assert block_skip_fraction(Layout(1024, 4, 508), "condensation") == pytest.approx(3 / 9)


@pytest.mark.parametrize("layout, mode, blocks", [
    (Layout(6, 2, 4), "condensation", ((0, 8, 0, 8), (8, 12, 6, 12))),  # [Q ; B] square, T against B and T
    (Layout(6, 0, 4), "condensation", ((0, 6, 0, 6), (6, 10, 5, 10))),  # no BToks: T sees the last Q column
    (Layout(6, 2, 4), "isolated", ((0, 6, 0, 6), (6, 12, 6, 12))),
    (Layout(6, 2, 4), "full", ((0, 12, 0, 12),)),
    (Layout(6, 2, 0), "condensation", ((0, 8, 0, 8),)),
])
def test_blocked_dense_attention_is_dense_attention(layout, mode, blocks):
    """Attention block by block equals one dense square under the same mask, values and gradients, with left
    padding in Q, right padding in T and a row whose target is all padding."""
    from btoks_jax.model import attention

    m = static_mask(layout, mode)
    assert attention.row_blocks(m) == blocks
    b, n, kv, h, t = 3, 4, 2, 8, layout.length
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))
    seg = np.ones((b, t), np.int32)
    seg[0, :2] = 0  # left padding of the query
    seg[1, t - 1:] = 0  # right padding of the target
    if layout.target_len:
        seg[2, layout.target_slice] = 0  # nothing to generate
    seg = jnp.asarray(seg)

    def dense(q, k, v):
        return attention.dense_attention(q, k, v, attention.dense_mask(seg, seg, m), 0.3)

    def blocked(q, k, v):
        return attention.blocked_dense_attention(q, k, v, attention.block_masks(seg, m), 0.3)

    np.testing.assert_allclose(blocked(q, k, v), dense(q, k, v), rtol=1e-6, atol=1e-6)
    weights = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(q, k, v) for f in (dense, blocked)]
    for got, want in zip(grads[1], grads[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_generative_loss_function_matches_two_pass(models):
    """The documented outside-the-loop GIC function on HF-processor-form inputs and a target text."""
    from btoks_jax.btoks import generative_loss
    from btoks_jax.processing import load_tokenizer

    hf, model = models
    tok = load_tokenizer()
    query = _image_query()
    text = "a small red fox"
    per_sample, scored, loss = generative_loss(model, query, [text], tok)
    ids = PREFIX + tok(text, add_special_tokens=False)["input_ids"] + [IM_END_ID]
    ref_logits, _ = _hf_two_pass(hf, query, ids)
    ref_scored = ref_logits[len(PREFIX) - 1:-1]  # the logits that predict the text tokens and <|im_end|>
    assert scored[0].shape == ref_scored.shape
    assert np.abs(scored[0] - ref_scored).max() <= TOL
    ref_nll = torch.nn.functional.cross_entropy(torch.from_numpy(ref_scored), torch.tensor(ids[len(PREFIX):]))
    assert abs(per_sample[0] - float(ref_nll)) <= TOL and abs(loss - float(ref_nll)) <= TOL


def test_btok_ids_come_from_the_directory(tmp_path):
    """A Hugging Face directory whose tokenizer has other added tokens before `<|btok_i|>` (ids 151660..):
    the model ties its BToks to those rows, so GIC logits equal transformers' tied head over that table."""
    from tokenizers import AddedToken

    from btoks_jax import build
    from btoks_jax.processing.tokenizer import add_btok_tokens, load_tokenizer, save_tokenizer

    tok = load_tokenizer()
    tok.add_tokens([AddedToken(f"<|extra_{i}|>", special=True, normalized=False) for i in range(3)],
                   special_tokens=True)
    ids = add_btok_tokens(tok, K)
    assert ids == list(range(BTOK_FIRST_ID + 3, BTOK_FIRST_ID + 3 + K))
    hf = H.hf_model(CFG, seed=11)
    btoks = np.random.default_rng(1).standard_normal((K, CFG.text_config.hidden_size)).astype(np.float32) * 0.05
    with torch.no_grad():
        hf.model.language_model.embed_tokens.weight[ids[0]:ids[0] + K] = torch.from_numpy(btoks)
    hf.save_pretrained(tmp_path)
    save_tokenizer(tok, tmp_path)

    model = build.build(CFG, num_btoks=K, hf_dir=str(tmp_path), progress=False)
    assert model.btok_ids == tuple(ids)
    assert np.array_equal(np.asarray(model.btoks.value), btoks)
    query = _image_query()
    target = _target([1000, 2000, 3000, 4000, 5])
    packed = pack(query, CFG, num_btoks=K, targets=[target], target_len=12)
    hidden = model.forward(packed.inputs, packed.layout)
    logits = np.asarray(model.target_logits(hidden[:, packed.layout.target_slice]))
    with torch.no_grad():
        ref = hf.lm_head(torch.from_numpy(np.asarray(hidden[:, packed.layout.target_slice]))).numpy()
    assert np.abs(logits - ref).max() <= TOL
    # The rows at the default ids 151657.. are ordinary vocabulary rows here, not BToks.
    assert np.abs(logits[..., ids[0]:ids[0] + K] - ref[..., ids[0]:ids[0] + K]).max() <= TOL
    default = BToksModel(CFG, K, rngs=nnx.Rngs(0), backbone=model.backbone)
    default.btoks.value = model.btoks.value
    wrong = np.asarray(default.target_logits(hidden[:, packed.layout.target_slice]))
    assert np.abs(wrong - ref).max() > 1e-3  # the hard-coded rows would have been wrong


def test_embedder_puts_the_btoks_inside_the_bucket(models):
    """The Embedder's query region is the power-of-two bucket less K when the input leaves room, so `[Q ; B]`
    fills the bucket (only an input within K tokens of the bucket's end gets the BToks after it); the embedding
    does not depend on that width."""
    from btoks_jax.api import Embedder, item_prompt, query_width
    from btoks_jax.evaluate.mmeb import Item

    assert [query_width(n, K) for n in (1, 12, 13, 16, 17, 100, 124, 125)] == [12, 12, 16, 16, 28, 124, 124, 128]
    assert query_width(20, 0) == 32  # last-token pooling: the bucket itself
    _, model = models
    embedder = Embedder.for_model(model, prompt_style="btoks")
    items = [Item(text="a short query"), Item(text="a somewhat longer query about a cat sitting on a mat")]
    packed, _ = embedder._pack_items(items)
    width = packed.layout.query_len + packed.layout.num_btoks
    assert width & (width - 1) == 0, packed.layout
    got = embedder.embed_batch(items)
    # The same rows with the BToks after the bucket, as before: the same embeddings.
    texts = [item_prompt(it, "btoks") for it in items]
    hf = embedder.processor(texts, padding_side="left")
    wide = pack(hf, CFG, num_btoks=K, query_len=width)
    want = np.asarray(model.pool(model.forward(wide.inputs, wide.layout), wide.layout))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
