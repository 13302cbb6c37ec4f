"""Model loading: tiny architectures, config-only directories on meta, the embedded SmolLM2."""

import json

import pytest
import torch
from conftest import TINY_ARCHS

from reft_lab.errors import ConfigError
from reft_lab.models import ModelConfig, decoder_layers, load_model
from reft_lab.models.loading import embedded_model_dir


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_are_seeded_and_layers_found(tiny, arch):
    a, b = tiny(arch), tiny(arch)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert len(decoder_layers(a.model)) == 4
    text = "Paris {\"answer\": 1}"
    assert a.tokenizer.decode(a.tokenizer(text)["input_ids"]) == text


def test_config_only_directory_loads_on_meta(tmp_path, tiny):
    tiny().model.config.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    loaded = load_model(ModelConfig(name_or_path=str(tmp_path)))
    assert loaded.on_meta and len(decoder_layers(loaded.model)) == 4


@pytest.mark.parametrize(
    "fields,key",
    [
        ({"name_or_path": "tiny:mamba"}, "model.name_or_path"),
        ({"name_or_path": "./missing/dir"}, "model.name_or_path"),
        ({"name_or_path": "embedded:gpt5"}, "model.name_or_path"),
        ({"dtype": "float8"}, "model.dtype"),
        ({"device": "tpu"}, "model.device"),
    ],
)
def test_bad_model_configs_name_the_key(fields, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_model(ModelConfig(**fields))


def test_config_only_directory_keeps_real_json(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(Exception, match="config.json|model.name_or_path"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))


@pytest.mark.slow
def test_embedded_smollm2_answers_a_factual_question():
    loaded = load_model(ModelConfig(device="cpu"))
    tok = loaded.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = loaded.model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    cached = json.loads((embedded_model_dir("smollm2-135m-instruct") / "config.json").read_text())
    assert cached["hidden_size"] == 576 and "quantization_config" not in cached
