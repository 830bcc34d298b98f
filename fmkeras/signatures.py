"""Serving functions of each task, exported as SavedModel signatures.

Every archive has `serving_default` (a batch of raw UTF-8 strings `texts`
in, named outputs out; tokenization, truncation, packing and
detokenization in the graph with core TensorFlow ops only, so stock TF
Serving loads it without tensorflow-text) and `serve_token_ids` (token ids
in, for clients that tokenize themselves):

classify   -> label, label_id, probabilities (batch, classes); a sentence-pair
              run takes two string inputs, `texts` and `text_pairs`, and
              packs `[CLS] a [SEP] b [SEP]` with segment ids in the graph.
tag        -> words, tags (batch, max_words), padded with ""; words beyond
              the sequence length are tagged O. Token ids -> tag_ids,
              probabilities per token.
translate  -> translation (batch,), token_ids (batch, max_length); beam
              search (or greedy) runs in the graph.
pretrain   -> fill-mask: texts with `[MASK]` -> tokens, probabilities
              (batch, masks, top_k) and mask_positions (batch, masks);
              rows with fewer masks are padded with "", 0 and -1.
causal_lm  -> prompts `texts` and the sampling settings (scalars
              `max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed`) ->
              text (prompt + continuation), continuation, token_ids, lengths;
              the cached sampling loop runs in the graph. Token ids in:
              `token_ids` starting with [SEP], `padding_mask`, and the settings.
"""

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from fmkeras.models.masked_lm import masked_lm_logits
from fmkeras.text.core_tokenizer import CoreBertTokenizer
from fmkeras.text.labelled import add_cls_sep, pack_pair, truncate_longest_first
from fmkeras.workarounds import save_signatures

MASK_TOKEN = "[MASK]"
ENCODER_INPUTS = ("token_ids", "segment_ids", "padding_mask")
PAIR_INPUTS = ("texts", "text_pairs")  # a sentence-pair classifier's string inputs


def core_tokenizer(tokenizer):
    """The serving twin of a training `WordPieceTokenizer`."""
    return CoreBertTokenizer(tokenizer.vocabulary, lowercase=tokenizer.lowercase)


def _encoder_features(ids, pad_id):
    """Encoder inputs for ragged `[CLS] ... [SEP]` ids `(batch, pieces)`."""
    token_ids = ids.to_tensor(pad_id)
    return {
        "token_ids": token_ids,
        "segment_ids": tf.zeros_like(token_ids),
        "padding_mask": tf.cast(tf.ones_like(ids).to_tensor(0), tf.int32),
    }


def classifier_functions(run):
    """Text and token-id serving functions of a classify run."""
    model, labels, length = run.model, run.labels, run.info["sequence_length"]
    tokenizer = core_tokenizer(run.tokenizer)
    cls_id, sep_id, pad_id = run.tokenizer.cls_id, run.tokenizer.sep_id, run.tokenizer.pad_id
    label_names = tf.constant(labels)

    def outputs(features):
        logits = model(features, training=False)
        label_id = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return {
            "label": tf.gather(label_names, label_id),
            "label_id": label_id,
            "probabilities": tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1),
        }

    def serve_texts(texts):
        ids = add_cls_sep(tokenizer.tokenize(texts)[:, : length - 2], cls_id, sep_id)
        return outputs(_encoder_features(ids, pad_id))

    def serve_text_pairs(texts, text_pairs):
        first, second = truncate_longest_first(
            tokenizer.tokenize(texts), tokenizer.tokenize(text_pairs), length - 3
        )
        ids, segments = pack_pair(first, second, cls_id, sep_id)
        return outputs({**_encoder_features(ids, pad_id), "segment_ids": segments.to_tensor(0)})

    def serve_token_ids(*ids):
        return outputs(dict(zip(ENCODER_INPUTS, ids, strict=True)))

    if run.info.get("text_pair_column"):  # sentence pairs: two string inputs
        return ServingFunctions(tokenizer, serve_text_pairs, serve_token_ids, ENCODER_INPUTS,
                                text_names=PAIR_INPUTS)  # fmt: skip
    return ServingFunctions(tokenizer, serve_texts, serve_token_ids, ENCODER_INPUTS)


def _ragged_fill(lengths, value):
    """Ragged rows holding `value`, `lengths[i]` times in row `i`."""
    return tf.RaggedTensor.from_row_lengths(tf.fill([tf.reduce_sum(lengths)], value), lengths)


def tagger_functions(run):
    """Text and token-id serving functions of a tag run."""
    model, length = run.model, run.info["sequence_length"]
    tokenizer = core_tokenizer(run.tokenizer)
    cls_id, sep_id, pad_id = run.tokenizer.cls_id, run.tokenizer.sep_id, run.tokenizer.pad_id
    tag_names = tf.constant(run.labels)

    def serve_texts(texts):
        words = tf.strings.split(texts)  # (batch, words)
        pieces = tokenizer.tokenize(words.flat_values)  # (all words, pieces)
        empty = tf.cast(tf.equal(pieces.row_lengths(), 0), tf.int64)  # e.g. only control chars
        pieces = tf.concat([pieces, _ragged_fill(empty, run.tokenizer.unk_id)], axis=1)
        first = _ragged_fill(pieces.row_lengths(), False)
        first = tf.concat([tf.ones_like(first[:, :1]), first[:, 1:]], axis=1)
        # (batch, pieces), cut to the length, with a flag on each word's first piece.
        ids = words.with_flat_values(pieces).merge_dims(1, 2)[:, : length - 2]
        flags = words.with_flat_values(first).merge_dims(1, 2)[:, : length - 2]
        features = _encoder_features(add_cls_sep(ids, cls_id, sep_id), pad_id)
        flags = flags.to_tensor(False)  # (batch, pieces)
        logits = model(features, training=False)[:, 1 : 1 + tf.shape(flags)[1]]
        tag_ids = tf.ragged.boolean_mask(tf.argmax(logits, axis=-1, output_type=tf.int32), flags)
        tags = tf.ragged.map_flat_values(tf.gather, tag_names, tag_ids)
        missing = words.row_lengths() - tags.row_lengths()  # words cut off by the length
        tags = tf.concat([tags, _ragged_fill(missing, "O")], axis=1)
        return {"words": words.to_tensor(""), "tags": tags.to_tensor("")}

    def serve_token_ids(*ids):
        logits = model(dict(zip(ENCODER_INPUTS, ids, strict=True)), training=False)
        return {
            "tag_ids": tf.argmax(logits, axis=-1, output_type=tf.int32),
            "probabilities": tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1),
        }

    return ServingFunctions(tokenizer, serve_texts, serve_token_ids, ENCODER_INPUTS)


def translator_functions(translate, beam_width):
    """Text and source-id signatures of a `Translate` (beam search in the graph)."""
    source = translate.source_tokenizer
    tokenizer = core_tokenizer(source)
    length = translate.sequence_length

    def outputs(source_ids):
        ids = translate.decode_ids(source_ids, beam_width)
        return {"translation": translate.detokenizer(ids), "token_ids": ids}

    def serve_texts(texts):
        ids = add_cls_sep(tokenizer.tokenize(texts)[:, : length - 2], source.cls_id, source.sep_id)
        return outputs(ids.to_tensor(source.pad_id))

    return ServingFunctions(tokenizer, serve_texts, outputs, ("source_ids",))


def fill_mask_functions(model, tokenizer, sequence_length, top_k):
    """Text and token-id signatures of a masked LM: the `top_k` pieces for
    every `[MASK]` in each text."""
    core = core_tokenizer(tokenizer)
    vocabulary = tf.constant(tokenizer.vocabulary)
    mask_id = tokenizer.mask_id

    def outputs(features):
        token_ids = features["token_ids"]
        is_mask = tf.logical_and(tf.equal(token_ids, mask_id), features["padding_mask"] > 0)
        positions = tf.ragged.boolean_mask(
            tf.broadcast_to(tf.range(tf.shape(token_ids)[1]), tf.shape(token_ids)), is_mask
        )  # (batch, masks)
        width = tf.maximum(tf.reduce_max(positions.row_lengths()), 1)  # at least one column
        extra = tf.fill([tf.shape(token_ids)[0], 1], -1)
        padded = tf.concat([positions.to_tensor(-1), extra], axis=1)[:, :width]  # (batch, masks)
        valid = padded >= 0
        mask_positions = tf.maximum(padded, 0)
        outputs = model({**features, "mask_positions": mask_positions}, training=False)
        logits = masked_lm_logits(outputs)  # (batch, masks, vocabulary)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        best, ids = tf.math.top_k(probabilities, k=top_k)  # (batch, masks, top_k)
        return {
            "tokens": tf.where(valid[..., None], tf.gather(vocabulary, ids), ""),
            "probabilities": tf.where(valid[..., None], best, 0.0),
            "mask_positions": tf.where(valid, mask_positions, -1),
        }

    def serve_texts(texts):
        # Tokenize the text between the [MASK] markers, then put a [MASK] id between.
        parts = tf.strings.split(texts, sep=MASK_TOKEN)  # (batch, parts)
        pieces = core.tokenize(parts.flat_values)  # (parts, pieces)
        is_last = tf.equal(tf.range(tf.size(parts.flat_values), dtype=tf.int64) + 1,
                           tf.gather(parts.row_limits(), parts.value_rowids()))  # fmt: skip
        masks = _ragged_fill(1 - tf.cast(is_last, tf.int64), mask_id)
        ids = parts.with_flat_values(tf.concat([pieces, masks], axis=1)).merge_dims(1, 2)
        ids = add_cls_sep(ids[:, : sequence_length - 2], tokenizer.cls_id, tokenizer.sep_id)
        return outputs(_encoder_features(ids, tokenizer.pad_id))

    def serve_token_ids(*ids):
        return outputs(dict(zip(ENCODER_INPUTS, ids, strict=True)))

    return ServingFunctions(core, serve_texts, serve_token_ids, ENCODER_INPUTS)


# The sampling settings of a causal LM's signatures: scalars after the text or id inputs.
GENERATION_SETTINGS = (
    tf.TensorSpec([], tf.int32, name="max_new_tokens"),
    tf.TensorSpec([], tf.float32, name="temperature"),
    tf.TensorSpec([], tf.int32, name="top_k"),
    tf.TensorSpec([], tf.float32, name="top_p"),
    tf.TensorSpec([], tf.int32, name="seed"),
)


def generation_functions(model, tokenizer):
    """Prompt and token-id signatures of a causal LM (`CausalLM`) with the
    sampling settings as inputs."""
    from fmkeras.tasks.causal_lm import TextGenerator  # the task module imports this one

    generator = TextGenerator(model, core_tokenizer(tokenizer), tokenizer)

    def serve_texts(texts, *settings):
        return generator.generate(texts, *settings)

    def serve_token_ids(token_ids, padding_mask, *settings):
        lengths = tf.reduce_sum(tf.cast(padding_mask > 0, tf.int32), axis=1)
        tokens, lengths = generator.generate_ids(token_ids, lengths, *settings)
        return {"token_ids": tokens, "lengths": lengths}

    return ServingFunctions(generator.tokenizer, serve_texts, serve_token_ids,
                            ("token_ids", "padding_mask"),
                            extra_inputs=GENERATION_SETTINGS)  # fmt: skip


@dataclasses.dataclass
class ServingFunctions:
    """A task's two serving functions and the tokenizer whose tables they use
    (the functions capture the model's variables themselves)."""

    tokenizer: CoreBertTokenizer
    serve_texts: Callable  # (batch,) strings named `text_names` -> dict of outputs
    serve_ids: Callable  # int32 (batch, seq) inputs named `id_names` -> dict of outputs
    id_names: tuple
    text_names: tuple = ("texts",)
    extra_inputs: tuple = ()  # `tf.TensorSpec`s both functions take after their own inputs

    def save(self, path, texts=True, id_shape=None):
        """Writes a SavedModel with `serving_default` (raw texts; the token-id
        function when `texts` is false) and `serve_token_ids`, whose inputs have
        the shape `id_shape` (`(batch, tokens)`; None: any shape). Each function
        is traced once (`fmkeras.workarounds.save_signatures`)."""
        extra = list(self.extra_inputs)
        shape = list(id_shape or (None, None))
        ids = [tf.TensorSpec(shape, tf.int32, name=name) for name in self.id_names]
        serve_ids = trace(self.serve_ids, ids + extra)
        signatures = {"serving_default": serve_ids, "serve_token_ids": serve_ids}
        if texts:
            strings = [tf.TensorSpec([None], tf.string, name=name) for name in self.text_names]
            signatures["serving_default"] = trace(self.serve_texts, strings + extra)
        tables = self.tokenizer.tables if texts else []
        save_signatures(path, signatures, resources=tables)


def trace(function, input_signature):
    """The concrete graph of `function` for `input_signature`, traced without
    AutoGraph as Keras's `ExportArchive` traces its endpoints."""
    return tf.function(function, input_signature=input_signature,
                       autograph=False).get_concrete_function()  # fmt: skip
