"""TrainConfig: reference defaults, validation messages that name the field, YAML round trip."""
import pytest

from qlora.config import GenerationSettings, TrainConfig, embedded_defaults


def test_defaults_are_the_reference_recipe():
    c = TrainConfig()
    assert (c.lora_r, c.lora_alpha, c.lora_dropout) == (64, 16, 0.1)
    assert c.quantize == "nf4" and c.batch_size == 4 and c.learning_rate == 2e-4
    assert (c.lr_scheduler, c.warmup_ratio, c.weight_decay, c.max_grad_norm) == ("cosine", 0.03, 0.001, 0.3)
    assert c.epochs == 1 and c.optimizer == "paged_adamw_32bit" and c.group_by_length and c.max_length == 1024
    assert c.gradient_checkpointing and c.target_modules == ["q_proj", "v_proj"]
    assert c.base_model == "NousResearch/Llama-2-7b-chat-hf" and c.dataset == "mlabonne/guanaco-llama2-1k"


@pytest.mark.parametrize("field, value", [
    ("learning_rate", -1.0), ("lora_r", 0), ("batch_size", 0), ("max_length", 0), ("lora_dropout", 1.0),
    ("quantize", "int3"), ("epochs", 0), ("eval_fraction", 0.9), ("target_modules", []), ("max_steps", 0),
    ("run_name", "../etc"), ("precision", "fp8"), ("lora_r", 2.5), ("batch_size", True), ("learning_rate", float("nan")),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        TrainConfig(**{field: value})


def test_yaml_round_trip(tmp_path):
    c = TrainConfig(**dict(embedded_defaults(), eval_fraction=0.2, seed=7))  # the preset holds out 0.1 itself
    path = tmp_path / "run.yaml"
    path.write_text(c.to_yaml())
    assert TrainConfig.from_yaml(path) == c


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_r: -3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: lora_r:"):
        TrainConfig.from_yaml(bad)
    bad.write_text("nonsense_field: 1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config field\(s\): nonsense_field"):
        TrainConfig.from_yaml(bad)


def test_target_modules_accepts_comma_text():
    assert TrainConfig(target_modules="q_proj, k_proj").target_modules == ["q_proj", "k_proj"]


def test_generation_settings_validate():
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=0)
    assert GenerationSettings(temperature=0).greedy
