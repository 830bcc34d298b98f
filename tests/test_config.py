from pathlib import Path

import pytest

from fmkeras.config import applies_to, build_config, lora_targets, parse_override
from fmkeras.errors import ConfigError

TRAINERS = Path(__file__).resolve().parents[1] / "trainers"


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("recipe", sorted(TRAINERS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_shrinks(recipe):
    config = build_config(recipe, ["model.size=tiny", "train.steps=30"])
    assert (config.model.size, config.train.steps) == ("tiny", 30)


def test_overrides_are_typed():
    config = build_config(
        None, ["train.steps=100", "train.learning_rate=3e-4", "model.normalize_first=true"]
    )
    assert config.train.steps == 100 and config.train.learning_rate == 3e-4
    assert config.model.normalize_first is True
    assert build_config(None, ["train.jit_compile=false"]).train.jit_compile == "false"
    assert build_config(None, ["train.warmup_steps=null"]).train.warmup_steps is None


def test_unknown_key_is_named_with_valid_keys_and_hint():
    with pytest.raises(ConfigError) as error:
        build_config(None, ["train.stpes=5"])
    message = str(error.value)
    assert "'train.stpes'" in message and "Did you mean 'train.steps'" in message
    assert "train.batch_size" in message
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'optim.lr'.*Valid keys: data, decode, distill, distribute, federated, "
        r"finetune, generate, model",
    ):
        build_config(None, ["optim.lr=1"])


def test_wrong_type_and_bad_choice_are_named():
    with pytest.raises(ConfigError, match=r"train.steps expects int, got 'many'"):
        build_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"train.batch_size expects int, got 1.5"):
        build_config(None, ["train.batch_size=1.5"])
    with pytest.raises(ConfigError, match=r"distribute.strategy='gpus' is not one of"):
        build_config(None, ["distribute.strategy=gpus"])
    with pytest.raises(ConfigError, match="train.steps must be positive"):
        build_config(None, ["train.steps=0"])
    with pytest.raises(ConfigError, match="expects key=value"):
        parse_override("train.steps")
    with pytest.raises(ConfigError, match="model is a section"):
        build_config(None, ["model=tiny"])


def test_recipe_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe.yaml: unknown key 'train.epochs'"):
        build_config(write(tmp_path, "train:\n  epochs: 3\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="exceeds model.max_sequence_length"):
        build_config(None, ["data.sequence_length=1024"])


def test_overrides_beat_recipe_which_beats_base(tmp_path):
    recipe = write(tmp_path, "model:\n  size: small\ntrain:\n  steps: 7\n")
    config = build_config(recipe, ["train.steps=9"], base={"model.size": "tiny", "train.seed": 5})
    assert (config.model.size, config.train.steps, config.train.seed) == ("small", 9, 5)


def test_finetune_keys_are_checked():
    config = build_config(None, ["finetune.method=lora", "finetune.lora_targets=query, output"])
    assert lora_targets(config.finetune) == ["query", "output"]
    with pytest.raises(ConfigError, match="finetune.method='qlora' is not one of full, lora"):
        build_config(None, ["finetune.method=qlora"])
    with pytest.raises(ConfigError, match="use a comma-separated subset of query, key, value"):
        build_config(None, ["finetune.lora_targets=query,ffn"])
    with pytest.raises(ConfigError, match="data.bad_rows='ignore' is not one of fail, skip"):
        build_config(None, ["data.bad_rows=ignore"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.size=tinyy", "model.size='tinyy' is not one of tiny, mini, small"),
        ("model.activation=tanhh", "model.activation='tanhh' is not one of gelu"),
        ("model.num_heads=3", "model.num_heads=3 must divide model.hidden_dim=256"),
        ("data.vocab_size=-5", "data.vocab_size must be positive, got -5"),
        ("train.learning_rate=0", "train.learning_rate must be positive"),
        ("model.dropout=1.5", "model.dropout must be in [0, 1)"),
        ("finetune.layer_decay=0", "finetune.layer_decay must be in (0, 1], got 0.0"),
        ("train.ema=1", "train.ema is a decay in [0, 1) (0: off), got 1.0"),
        ("distribute.strategy=tpu", "distribute.strategy=tpu needs distribute.tpu"),
        ("train.precision=fp8", "train.precision='fp8' is not one of auto, float32"),
        ("train.profile_steps=5", "train.profile_steps='5': use START,END"),
        ("train.profile_steps=10,5", "need 0 <= START < END <= train.steps=2000"),
    ],
)
def test_bad_settings_fail_at_validation(override, message):
    with pytest.raises(ConfigError) as error:
        build_config(None, [override])
    assert message in str(error.value)


def test_custom_sizes_need_every_dimension():
    with pytest.raises(ConfigError, match="model.size=custom needs model.num_layers"):
        build_config(None, ["model.size=custom", "model.hidden_dim=96", "model.num_heads=2",
                            "model.intermediate_dim=128"])  # fmt: skip
    # A checkpoint fixes the architecture: its sizes are not checked against the keys.
    build_config(None, ["model.init=runs/x", "model.num_heads=3"])


def test_keys_say_which_tasks_read_them():
    assert applies_to("data.mask_rate", "mlm") and not applies_to("data.mask_rate", "classify")
    assert applies_to("finetune.method", "tag") and not applies_to("finetune.method", "mlm")
    assert applies_to("decode.beam_width", "translate")
    assert applies_to("train.steps", "my_task")  # every task reads the shared keys
