import keras
import keras_hub
import numpy as np
import pytest
from layer_checks import run_layer_checks

from fmkeras.layers import (
    LayerNormalization,
    MaskedLMHead,
    MultiHeadAttention,
    TextEmbedding,
    TransformerDecoderBlock,
    TransformerEncoderBlock,
)

RNG = np.random.default_rng(0)
HIDDEN = np.asarray(RNG.normal(size=(2, 6, 16)), "float32")
SOURCE = np.asarray(RNG.normal(size=(2, 5, 16)), "float32")
PADDING = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], "int32")


def test_layer_normalization_contract(tmp_path):
    run_layer_checks(
        LayerNormalization, dict(epsilon=1e-12), {"inputs": HIDDEN}, (2, 6, 16), tmp_path
    )


def test_multi_head_attention_contract(tmp_path):
    run_layer_checks(
        MultiHeadAttention,
        dict(num_heads=2, key_dim=8, dropout=0.1),
        {"query": HIDDEN, "value": SOURCE},
        (2, 6, 16),
        tmp_path,
    )


@pytest.mark.parametrize("normalize_first", [False, True])
def test_encoder_block_contract(tmp_path, normalize_first):
    run_layer_checks(
        TransformerEncoderBlock,
        dict(num_heads=2, intermediate_dim=32, dropout=0.1, normalize_first=normalize_first),
        {"inputs": HIDDEN, "padding_mask": PADDING},
        (2, 6, 16),
        tmp_path,
    )


def test_decoder_block_contract(tmp_path):
    run_layer_checks(
        TransformerDecoderBlock,
        dict(num_heads=2, intermediate_dim=32, dropout=0.1, activation="relu"),
        {"decoder_sequence": HIDDEN, "encoder_sequence": SOURCE},
        (2, 6, 16),
        tmp_path,
    )


@pytest.mark.parametrize("block_class, inputs", [
    (TransformerEncoderBlock, {"inputs": HIDDEN, "padding_mask": PADDING}),
    (TransformerDecoderBlock, {"decoder_sequence": HIDDEN, "encoder_sequence": SOURCE}),
])  # fmt: skip
def test_blocks_without_biases_keep_only_the_layer_norms_biases(tmp_path, block_class, inputs):
    """`use_bias=False` (Cramming): no attention or feed-forward bias; LayerNorm's beta stays."""
    kwargs = dict(num_heads=2, intermediate_dim=32, dropout=0.1, use_bias=False)
    run_layer_checks(block_class, kwargs, inputs, (2, 6, 16), tmp_path)
    block = block_class(**kwargs)
    block(*inputs.values())
    with_biases = block_class(**{**kwargs, "use_bias": True})
    with_biases(*inputs.values())
    names = [weight.path.split("/", 1)[1] for weight in block.weights]
    assert not [name for name in names if name.endswith("bias")], names
    assert sum(name.endswith("beta") for name in names) == (2 if block_class is
                                                             TransformerEncoderBlock else 3)
    # Every removed weight is a projection bias: 4 per attention layer + the two FFN ones.
    attention_layers = 1 if block_class is TransformerEncoderBlock else 2
    assert with_biases.count_params() - block.count_params() == \
        attention_layers * 4 * 16 + 32 + 16  # fmt: skip


def test_text_embedding_contract(tmp_path):
    run_layer_checks(
        TextEmbedding,
        dict(vocabulary_size=30, hidden_dim=16, max_sequence_length=8, dropout=0.1),
        {"token_ids": RNG.integers(0, 30, (2, 6)).astype("int32"), "segment_ids": PADDING},
        (2, 6, 16),
        tmp_path,
    )


def test_masked_lm_head_contract(tmp_path):
    run_layer_checks(
        MaskedLMHead,
        dict(vocabulary_size=30, intermediate_activation="gelu_approximate"),
        {"inputs": HIDDEN, "mask_positions": np.array([[0, 3], [5, 1]], "int32")},
        (2, 2, 30),
        tmp_path,
    )


def test_masked_lm_head_ties_to_embedding():
    embedding = TextEmbedding(30, 16, max_sequence_length=8)
    embedding(np.zeros((1, 4), "int32"))
    head = MaskedLMHead(30, token_embedding=embedding.token_embedding)
    positions = np.array([[0, 3], [5, 1]], "int32")
    logits = keras.ops.convert_to_numpy(head(HIDDEN, mask_positions=positions))
    assert not hasattr(head, "output_kernel")
    # Doubling the shared table changes logits exactly like doubling the projection.
    table = embedding.token_embedding.embeddings
    table.assign(table * 2.0)
    doubled = keras.ops.convert_to_numpy(head(HIDDEN, mask_positions=positions))
    bias = keras.ops.convert_to_numpy(head.output_bias)
    np.testing.assert_allclose(doubled - bias, 2 * (logits - bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        MaskedLMHead(31, token_embedding=embedding.token_embedding)(
            HIDDEN, mask_positions=positions
        )


def _copy_attention(mine, reference):
    """Keras MHA and ours have the same projection shapes, in the same order."""
    mine.set_weights(reference.get_weights())


def test_attention_matches_keras_multi_head_attention():
    reference = keras.layers.MultiHeadAttention(num_heads=4, key_dim=4)
    reference(HIDDEN[:, :5], SOURCE)
    mine = MultiHeadAttention(num_heads=4, key_dim=4)
    mine(HIDDEN[:, :5], SOURCE)
    _copy_attention(mine, reference)
    mask = np.ones((2, 5, 5), bool)
    mask[1, :, 3:] = False  # padded keys in the second example
    expected = reference(HIDDEN[:, :5], SOURCE, attention_mask=mask)
    np.testing.assert_allclose(
        mine(HIDDEN[:, :5], SOURCE, attention_mask=mask), expected, atol=1e-5
    )
    # The explicit (dropout-capable) path computes the same thing and the same scores.
    output, scores = mine(HIDDEN[:, :5], SOURCE, attention_mask=mask, return_attention_scores=True)
    expected, expected_scores = reference(
        HIDDEN[:, :5], SOURCE, attention_mask=mask, return_attention_scores=True
    )
    np.testing.assert_allclose(output, expected, atol=1e-5)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_attention_causal_mask_matches_keras():
    reference = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)
    reference(HIDDEN, HIDDEN)
    mine = MultiHeadAttention(num_heads=2, key_dim=8)
    mine(HIDDEN, HIDDEN)
    _copy_attention(mine, reference)
    expected = reference(HIDDEN, HIDDEN, use_causal_mask=True)
    np.testing.assert_allclose(mine(HIDDEN, HIDDEN, use_causal_mask=True), expected, atol=1e-5)
    # Causality: changing the last token leaves earlier outputs alone.
    changed = HIDDEN.copy()
    changed[:, -1] += 1.0
    again = mine(changed, changed, use_causal_mask=True)
    np.testing.assert_allclose(again[:, :-1], expected[:, :-1], atol=1e-5)


@pytest.mark.parametrize("normalize_first", [False, True])
def test_encoder_block_matches_keras_hub(normalize_first):
    kwargs = dict(
        num_heads=4, intermediate_dim=32, activation="gelu", normalize_first=normalize_first
    )
    reference = keras_hub.layers.TransformerEncoder(layer_norm_epsilon=1e-5, **kwargs)
    reference(HIDDEN, padding_mask=PADDING)
    mine = TransformerEncoderBlock(layer_norm_epsilon=1e-5, **kwargs)
    mine(HIDDEN, padding_mask=PADDING)
    for name in (
        "self_attention_layer",
        "self_attention_layer_norm",
        "feedforward_intermediate_dense",
        "feedforward_output_dense",
        "feedforward_layer_norm",
    ):
        getattr(mine, name).set_weights(getattr(reference, f"_{name}").get_weights())
    expected = reference(HIDDEN, padding_mask=PADDING)
    np.testing.assert_allclose(mine(HIDDEN, padding_mask=PADDING), expected, atol=1e-5)


def test_decoder_cache_matches_full_recomputation():
    keras.utils.set_random_seed(1)
    block = TransformerDecoderBlock(num_heads=2, intermediate_dim=32)
    full = keras.ops.convert_to_numpy(block(HIDDEN, SOURCE))  # (2, 6, 16), causal
    cross_cache = block.compute_cross_attention_cache(SOURCE)
    cache = np.zeros((2, 2, 6, 2, 8), "float32")
    steps = []
    for index in range(6):
        output, cache, _ = block(
            HIDDEN[:, index : index + 1],
            SOURCE,
            self_attention_cache=cache,
            self_attention_cache_update_index=index,
            cross_attention_cache=cross_cache,
        )
        steps.append(keras.ops.convert_to_numpy(output))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="divisible"):
        TransformerEncoderBlock(num_heads=3, intermediate_dim=8)(HIDDEN)
    with pytest.raises(ValueError, match="Unknown activation 'tanhh'"):
        TransformerEncoderBlock(num_heads=2, intermediate_dim=8, activation="tanhh")
