"""Hugging Face BERT import: numbers match a reference forward pass, the
tokenizer matches HF's, the converted encoder reloads, bad checkpoints say why."""

import json
import shutil

import numpy as np
import pytest
from hf_reference import bert_forward
from safetensors.numpy import save_file

import fmkeras
from fmkeras.convert import main as convert_main
from fmkeras.errors import ConfigError, DataError
from fmkeras.models.hf_bert import load_hf_bert, read_hf_tensors
from fmkeras.models.starting_point import load_starting_point
from fmkeras.text.wordpiece import WordPieceTokenizer

IDS = np.array(
    [[101, 7592, 2088, 999, 102, 2129, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 1012, 102, 2, 0]],
    "int32",
)
INPUTS = {
    "token_ids": IDS,
    "segment_ids": np.array([[0, 0, 0, 0, 0, 1, 1, 0, 0], [0] * 9], "int32"),
    "padding_mask": (IDS > 0).astype("int32"),
}


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_hf_bert(minilm_dir, dropout=0.0)


def assert_matches_reference(encoder, minilm_dir):
    config = json.loads((minilm_dir / "config.json").read_text())
    sequence, pooled = bert_forward(
        read_hf_tensors(minilm_dir), config, IDS, INPUTS["segment_ids"], INPUTS["padding_mask"]
    )
    outputs = encoder(INPUTS)
    real = INPUTS["padding_mask"][..., None].astype(bool)
    np.testing.assert_allclose(
        np.where(real, outputs["sequence_output"], 0), np.where(real, sequence, 0), atol=1e-4
    )
    np.testing.assert_allclose(outputs["pooled_output"], pooled, atol=1e-4)


def test_import_reproduces_hugging_face_bert(minilm, minilm_dir):
    assert (minilm.num_layers, minilm.hidden_dim, minilm.num_heads) == (6, 384, 12)
    assert_matches_reference(minilm, minilm_dir)


def test_tokenizer_matches_hugging_face(minilm_dir, data_dir):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    reference.no_padding()
    reference.no_truncation()
    ours = WordPieceTokenizer(minilm_dir / "vocab.txt", lowercase=True)
    dev = (data_dir / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    zh = (data_dir / "tatoeba_en_zh" / "valid.zh").read_text(encoding="utf-8").splitlines()
    lines = (
        [row.split("\t")[0] for row in dev]
        + zh[:300]
        + [
            "Héllo Wörld!! naïve café",
            "東京タワー is 333m, ＡＢＣ，全角",
            "soft\u00adhyphen zero\u200bwidth \x00control\x07 tab\there",
            "İstanbul ß ﬁ don't U.S.A.",
        ]
    )
    got = ours.tokenize(lines).to_list()
    for line, ids in zip(lines, got, strict=True):
        assert ids == reference.encode(line, add_special_tokens=False).ids, line


def test_convert_command_writes_a_reloadable_encoder(tmp_path, minilm_dir, capsys):
    out = tmp_path / "minilm"
    assert convert_main(["hf-bert", str(minilm_dir), str(out)]) == 0
    assert "6 layers, width 384" in capsys.readouterr().out
    reloaded = fmkeras.load_model(out / "encoder.keras")
    assert_matches_reference(reloaded, minilm_dir)  # dropout is inactive at inference
    start = load_starting_point(str(out), dropout=0.0)  # a converted directory is a model.init
    assert start.kind == "fmkeras encoder" and start.lowercase
    assert (out / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()
    np.testing.assert_allclose(
        start.encoder(INPUTS)["pooled_output"], reloaded(INPUTS)["pooled_output"]
    )


def copy_checkpoint(minilm_dir, target, drop=None, reshape=None, config_changes=None, extra=None):
    target.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, target / name)
    config = {**json.loads((minilm_dir / "config.json").read_text()), **(config_changes or {})}
    (target / "config.json").write_text(json.dumps(config))
    tensors = read_hf_tensors(minilm_dir)
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    tensors.update(extra or {})
    save_file(tensors, str(target / "model.safetensors"))
    return target


def test_a_checkpoints_pretraining_head_continues_masked_lm_training(tmp_path, minilm_dir):
    """`cls.predictions.*` (BERT's pretraining head) loads into the masked LM of
    continued pretraining; a checkpoint without one gets a new head."""
    from fmkeras.models import MaskedLM
    from fmkeras.models.starting_point import load_mlm_head, load_starting_point

    generator = np.random.default_rng(0)
    head = {
        "cls.predictions.transform.dense.weight": generator.normal(size=(384, 384)),
        "cls.predictions.transform.dense.bias": generator.normal(size=384),
        "cls.predictions.transform.LayerNorm.weight": generator.normal(size=384),
        "cls.predictions.transform.LayerNorm.bias": generator.normal(size=384),
        "cls.predictions.bias": generator.normal(size=30522),
    }
    head = {name: value.astype(np.float32) for name, value in head.items()}
    with_head = copy_checkpoint(minilm_dir, tmp_path / "bert", extra=head)
    cases = [(with_head, "the checkpoint's masked-LM head"),
             (minilm_dir, "a new masked-LM head (the checkpoint has none)")]  # fmt: skip
    for init, expected in cases:
        model = MaskedLM(load_starting_point(str(init), 0.0).encoder)
        assert load_mlm_head(model, str(init)) == expected
    model = MaskedLM(load_starting_point(str(with_head), 0.0).encoder)
    load_mlm_head(model, str(with_head))
    np.testing.assert_array_equal(model.head.transform_dense.kernel,
                                  head["cls.predictions.transform.dense.weight"].T)  # fmt: skip
    np.testing.assert_array_equal(model.head.output_bias, head["cls.predictions.bias"])


KEY = "encoder.layer.3.attention.self.key.weight"
BIAS = "encoder.layer.0.intermediate.dense.bias"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(drop=KEY), f"lacks the tensors {KEY}"),
        (dict(reshape=BIAS), f"{BIAS} has shape (1535,)"),
        (dict(config_changes={"position_embedding_type": "relative_key"}),
         "position_embedding_type='relative_key'"),
        (dict(config_changes={"hidden_act": "swish_gated"}), "hidden_act='swish_gated'"),
        (dict(config_changes={"vocab_size": 30000}),
         "word_embeddings.weight has shape (30522, 384)"),
    ],
)  # fmt: skip
def test_bad_checkpoints_name_the_tensor_or_key(tmp_path, minilm_dir, change, message):
    broken = copy_checkpoint(minilm_dir, tmp_path / "broken", **change)
    with pytest.raises(
        (ConfigError, DataError), match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        load_starting_point(str(broken), dropout=0.1)


def test_bad_model_init_is_explained(tmp_path, capsys):
    with pytest.raises(ConfigError, match="is not a directory"):
        load_starting_point(str(tmp_path / "nowhere"), 0.1)
    with pytest.raises(ConfigError, match="pip install"):
        load_starting_point("python:not_a_package_here/model", 0.1)
    with pytest.raises(ConfigError, match="holds neither an fmkeras encoder"):
        load_starting_point(str(tmp_path), 0.1)
    assert convert_main(["hf-bert", str(tmp_path), str(tmp_path / "out")]) == 2
    capsys.readouterr()
    assert convert_main(["hf-bert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert f"error: SOURCE='{tmp_path / 'nowhere'}': " in capsys.readouterr().err
