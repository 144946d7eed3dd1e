"""`GemmaCausalLM.score`: per-token logits and losses, and layer intercepts,
against transformers with identical weights (forward hooks and
`inputs_embeds` play the intercepts there)."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_gemma
from tests import helpers
from tests.test_families import GEMMA2
from tests.test_families import GEMMA3

TOLERANCE = 1e-4  # float32, identical weights, eager attention.
CONFIGS = {"gemma": helpers.TINY_MQA, "gemma2": GEMMA2, "gemma3_text": GEMMA3}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request, vocabulary_size):
    family = request.param
    return helpers.hf_reference_and_ours(vocabulary_size, CONFIGS[family], seed=3, family=family)


@pytest.fixture(scope="module")
def batch(vocabulary_size):
    token_ids = helpers.random_token_ids(vocabulary_size, (2, 10), seed=5)
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 7:] = 0  # Right padding in the second row.
    return token_ids, padding_mask


def hf_forward(hf_model, token_ids, padding_mask, embeddings_fn=lambda e: e, block_fns=None):
    """transformers' logits (a torch tensor) with `embeddings_fn` applied to
    the unscaled token embeddings and `block_fns[i]` to block i's output."""
    import torch

    inner = hf_model.model
    table = inner.embed_tokens.weight
    unscaled = embeddings_fn(table[torch.as_tensor(token_ids, dtype=torch.long)])
    scaled = unscaled * torch.tensor(hf_model.config.hidden_size**0.5, dtype=table.dtype)

    def hook(fn):
        def replace_output(module, args, output):
            if isinstance(output, tuple):
                return (fn(output[0]), *output[1:])
            return fn(output)

        return replace_output

    handles = [inner.layers[i].register_forward_hook(hook(fn)) for i, fn in (block_fns or {}).items()]
    try:
        return hf_model(inputs_embeds=scaled, attention_mask=torch.as_tensor(padding_mask)).logits
    finally:
        for handle in handles:
            handle.remove()


def numpy_token_losses(logits, targets):
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def compiled(fn):
    """`fn` under `jax.jit`, `tf.function` or `torch.compile`."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    import torch

    return torch.compile(fn, backend="eager")


def test_logits_are_calls_and_transformers(models, batch):
    hf_model, ours = models
    token_ids, padding_mask = batch
    logits = ops.convert_to_numpy(ours.score(token_ids, padding_mask))
    called = ours({"token_ids": token_ids, "padding_mask": padding_mask})
    np.testing.assert_allclose(logits, ops.convert_to_numpy(called), atol=1e-5, rtol=0)
    expected = helpers.hf_logits(hf_model, token_ids, padding_mask)
    valid = padding_mask.astype(bool)
    np.testing.assert_allclose(logits[valid], expected[valid], atol=TOLERANCE, rtol=0)
    if ours.backbone.final_logit_soft_cap:  # Gemma 2: the soft-cap bites.
        assert np.abs(logits).max() < ours.backbone.final_logit_soft_cap


def test_loss_is_each_tokens_cross_entropy(models, batch):
    hf_model, ours = models
    token_ids, padding_mask = batch
    targets = np.roll(token_ids, -1, axis=1)
    losses = ours.score(token_ids, padding_mask, scoring_mode="loss", target_ids=targets)
    losses = ops.convert_to_numpy(losses)
    assert losses.shape == token_ids.shape and losses.dtype == np.float32
    expected = numpy_token_losses(helpers.hf_logits(hf_model, token_ids, padding_mask), targets)
    valid = padding_mask.astype(bool)
    np.testing.assert_allclose(losses[valid], expected[valid], atol=TOLERANCE, rtol=0)


def test_loss_computes_the_logits_a_chunk_of_tokens_at_a_time(models, batch, monkeypatch):
    """A long document's logits (1 GiB per 1k tokens of Gemma 3) were built
    whole for its losses; now a chunk of tokens at a time, same losses."""
    from keras_gemma.models import gemma_causal_lm

    _, ours = models
    token_ids, padding_mask = batch
    targets = np.roll(token_ids, -1, axis=1)
    whole = ops.convert_to_numpy(ours.score(token_ids, padding_mask, scoring_mode="loss", target_ids=targets))
    vocabulary_size = ours.backbone.vocabulary_size
    monkeypatch.setattr(gemma_causal_lm, "DEFAULT_LOGITS_PER_CHUNK", vocabulary_size * 6)
    chunks = []
    token_logits = ours.backbone.token_logits

    def recorded(hidden_states):
        chunks.append(tuple(ops.shape(hidden_states)))
        return token_logits(hidden_states)

    monkeypatch.setattr(ours.backbone, "token_logits", recorded)
    chunked = ops.convert_to_numpy(ours.score(token_ids, padding_mask, scoring_mode="loss", target_ids=targets))
    # 20 tokens in chunks of 6 (the last padded).
    assert chunks == [(6, ours.backbone.hidden_dim)] * 4
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=0)
    # Compiled: one loop over the chunks (unrolled, XLA kept all their logits).
    chunks.clear()
    losses = compiled(lambda ids, mask, target_ids: ours.score(ids, mask, scoring_mode="loss", target_ids=target_ids))
    np.testing.assert_allclose(ops.convert_to_numpy(losses(token_ids, padding_mask, targets)), whole, atol=1e-5, rtol=0)
    # JAX and TensorFlow trace the loop's body, not each of the 4 chunks
    # (TensorFlow twice); PyTorch's map is a Python loop.
    assert set(chunks) == {(6, ours.backbone.hidden_dim)}
    assert len(chunks) == 4 if keras.config.backend() == "torch" else len(chunks) < 4
    empty = ours.score(token_ids[:0], scoring_mode="loss", target_ids=targets[:0])  # No rows.
    assert tuple(ops.shape(empty)) == (0, 10)
    logits = ops.convert_to_numpy(ours.score(token_ids, padding_mask))
    np.testing.assert_allclose(chunked, numpy_token_losses(logits, targets), atol=1e-5, rtol=0)


def test_score_compiles(models, batch):
    """Inside jax.jit / tf.function (gradients through an intercept, say) the
    id check converted the traced ids to NumPy and failed; KerasHub's runs."""
    _, ours = models
    token_ids, padding_mask = batch
    targets = np.roll(token_ids, -1, axis=1)

    def losses(ids, mask, target_ids):
        return ours.score(ids, mask, scoring_mode="loss", target_ids=target_ids)

    np.testing.assert_allclose(
        ops.convert_to_numpy(compiled(losses)(token_ids, padding_mask, targets)),
        ops.convert_to_numpy(losses(token_ids, padding_mask, targets)), atol=1e-5, rtol=0,
    )


def test_layer_intercepts_change_what_goes_on(models, batch):
    """Each intercept's return value is used: at -1 (the embeddings before
    the sqrt(hidden_dim) scaling, which KerasHub's `score` drops) and after
    each block."""
    import torch

    hf_model, ours = models
    token_ids, padding_mask = batch
    hidden = ours.backbone.hidden_dim
    num_layers = ours.backbone.num_layers
    rng = np.random.default_rng(0)
    shifts = rng.normal(size=(num_layers + 1, hidden)).astype("float32") * 0.5
    seen = []

    def intercept(x, i):
        seen.append((i, tuple(ops.shape(x))))
        if i == -1:
            return ops.add(ops.multiply(x, 0.5), shifts[-1])
        return ops.add(x, shifts[i])

    logits = ops.convert_to_numpy(ours.score(token_ids, padding_mask, layer_intercept_fn=intercept))
    assert seen == [(i, (*token_ids.shape, hidden)) for i in range(-1, num_layers)]
    t = torch.as_tensor
    with torch.no_grad():
        expected = hf_forward(
            hf_model, token_ids, padding_mask,
            embeddings_fn=lambda e: e * 0.5 + t(shifts[-1]),
            block_fns={i: (lambda x, s=t(shifts[i]): x + s) for i in range(num_layers)},
        ).numpy()
        plain = helpers.hf_logits(hf_model, token_ids, padding_mask)
    valid = padding_mask.astype(bool)
    np.testing.assert_allclose(logits[valid], expected[valid], atol=TOLERANCE, rtol=0)
    assert np.abs(expected - plain)[valid].max() > 0.1  # The intercepts matter.


def test_loss_gradients_reach_intercepted_embeddings(models, vocabulary_size):
    """Attribution: replace the embeddings with a variable at -1 and
    differentiate the summed token losses with respect to it."""
    import torch

    hf_model, ours = models
    token_ids = helpers.random_token_ids(vocabulary_size, (2, 8), seed=6)
    targets = np.roll(token_ids, -1, axis=1)
    table = ops.convert_to_numpy(ours.backbone.token_embedding.embeddings)
    embeddings = keras.Variable(table[token_ids], name="embeddings")

    def summed_loss():
        losses = ours.score(
            token_ids, scoring_mode="loss", target_ids=targets,
            layer_intercept_fn=lambda x, i: embeddings.value if i == -1 else x,
        )
        return ops.sum(losses)

    (grad,) = helpers.gradients(summed_loss, [embeddings])
    leaf = hf_model.model.embed_tokens.weight.detach()[torch.as_tensor(token_ids, dtype=torch.long)]
    leaf.requires_grad_(True)
    logits = hf_forward(hf_model, token_ids, np.ones_like(token_ids), embeddings_fn=lambda e: leaf)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.as_tensor(targets, dtype=torch.long).reshape(-1),
        reduction="sum",
    )
    loss.backward()
    np.testing.assert_allclose(grad, leaf.grad.numpy(), atol=TOLERANCE, rtol=1e-3)
    assert np.abs(grad).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scoring_mode="probabilities"), 'scoring_mode must be "logits" or "loss"'),
        (dict(scoring_mode="loss"), "needs target_ids"),
        (dict(scoring_mode="loss", target_ids=np.zeros((2, 9), "int32")), r"target_ids must have the token ids' shape \(2, 10\)"),
        (dict(padding_mask=np.ones((10,), "int32")), r"padding_mask must have the token ids' shape"),
        (dict(layer_intercept_fn=lambda x, i: x[:, :1]), "layer_intercept_fn returned shape .* at layer -1"),
    ],
)
def test_bad_score_arguments_are_clear_errors(vocabulary_size, batch, kwargs, message):
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    )
    token_ids, _ = batch
    with pytest.raises(ValueError, match=message):
        gemma_lm.score(token_ids, **kwargs)
    with pytest.raises(ValueError, match=r"token_ids must be \[batch, seq\] token ids, got shape \(10,\)"):
        gemma_lm.score(token_ids[0])


@pytest.mark.parametrize("bad_id", [-100, "vocabulary_size"])
def test_ids_outside_the_vocabulary_are_clear_errors(vocabulary_size, batch, bad_id):
    # Before: NaN logits on JAX, an IndexError on PyTorch; a target outside
    # the table scored 0 on JAX and PyTorch and failed inside TensorFlow.
    bad_id = vocabulary_size if bad_id == "vocabulary_size" else bad_id
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    )
    token_ids, _ = batch
    bad = token_ids.copy()
    bad[1, 3] = bad_id
    message = rf"must be token ids in \[0, {vocabulary_size}\), got {bad_id}"
    with pytest.raises(ValueError, match="token_ids " + message):
        gemma_lm.score(bad)
    with pytest.raises(ValueError, match="target_ids " + message):
        gemma_lm.score(token_ids, scoring_mode="loss", target_ids=bad)
