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


def test_auto_dtype_is_bf16_on_cuda_only_and_decided_before_the_run(monkeypatch):
    """model.dtype=auto (the default): a bf16 base on CUDA, fp32 on a CPU and on meta. RunSettings
    records the decided dtype, so a CPU job's fingerprint is the one an explicit float32 gives (its
    checkpoints and finished results stay valid); CUDA faked, the job's base is bf16 for every
    method, and full fine-tuning trains an fp32 copy of it."""
    from reft_lab.config import compose
    from reft_lab.methods import method_config
    from reft_lab.settings import RunSettings, config_fingerprint

    auto = ModelConfig()
    assert auto.dtype == "auto"
    assert [auto.resolved_dtype(torch.device(d)) for d in ("cuda", "cpu", "meta")] == ["bfloat16", "float32", "float32"]
    assert ModelConfig(dtype="float16").resolved_dtype(torch.device("cuda")) == "float16"
    assert load_model(ModelConfig(name_or_path="tiny:llama", device="cpu")).model.dtype == torch.float32
    assert load_model(ModelConfig(name_or_path="tiny:llama", device="meta")).model.dtype == torch.float32

    def settings(*overrides):
        return RunSettings.from_cfg(compose(["model=tiny", *overrides]))

    default, explicit = settings("model.device=cpu"), settings("model.device=cpu", "model.dtype=float32")
    assert default.model.dtype == "float32" and config_fingerprint(default) == config_fingerprint(explicit)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for method in ("loreft", "lora", "full"):
        on_cuda = settings("model.device=auto", f"method={method}")
        assert on_cuda.model.dtype == "bfloat16" and on_cuda.model.torch_dtype() == torch.bfloat16
    assert method_config({"name": "full"}).base_dtype_attached(torch.bfloat16) == torch.float32
    assert settings("model.device=auto", "model.dtype=float32").model.dtype == "float32"
    assert config_fingerprint(settings("model.device=auto")) != config_fingerprint(default)


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
