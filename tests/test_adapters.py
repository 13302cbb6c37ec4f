"""Adapters: save → load gives identical logits; pyreft import/export; mismatched bases refused."""

import json
import os

import pytest
import torch
from test_methods import METHOD_ROWS, _train_steps

from reft_lab.accounting import param_report
from reft_lab.adapters import (
    CONFIG_FILE,
    LEGACY_FORMAT,
    PEFT_CONFIG_FILE,
    WEIGHTS_FILE,
    export_pyreft,
    import_pyreft,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from reft_lab.errors import AdapterError
from reft_lab.methods import attach

pytestmark = pytest.mark.floor  # run again on the oldest transformers/peft (make test-floor)


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("row", METHOD_ROWS, ids=lambda r: r["name"])
def test_save_load_identical_logits(tiny, batch, tmp_path, row, base_dtype):
    """On a bf16 base too: trainable state stays fp32 (full fine-tuning's included) and reloads."""
    loaded = tiny(dtype=base_dtype)
    tuned = attach(loaded.model, dict(row), loaded.name)
    if row["name"] != "none":
        _train_steps(tuned)
    ids, mask, lengths = batch
    expected = tuned(ids, attention_mask=mask, prompt_lengths=lengths).logits
    save_adapter(tuned, tmp_path)
    assert os.path.getsize(tmp_path / WEIGHTS_FILE) == param_report(tuned).adapter_bytes
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["method"]["name"] == row["name"] and config["base"]["name_or_path"] == "tiny:llama"
    assert config["base"]["fingerprint"] and config["dtype"] in ("float32", []) and config["base"]["dtype"] == base_dtype
    restored = load_adapter(tiny(dtype=base_dtype).model, tmp_path)
    assert torch.equal(restored(ids, attention_mask=mask, prompt_lengths=lengths).logits, expected)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_lora_adapter_is_peft_format_that_plain_peft_loads(tiny, batch, tmp_path, name):
    """``PeftModel.from_pretrained`` reads a reft_lab LoRA/DoRA adapter directory as it is and gives
    the same logits; reft_lab's own metadata sits in a file of its own."""
    from peft import PeftModel
    from safetensors.torch import load_file

    loaded = tiny()
    tuned = attach(loaded.model, {"name": name, "dropout": 0.0}, loaded.name)
    _train_steps(tuned)
    ids, mask, lengths = batch
    expected = tuned(ids, attention_mask=mask, prompt_lengths=lengths).logits
    save_adapter(tuned, tmp_path)
    peft_config = json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["use_dora"] == (name == "dora")
    assert all(key.startswith("base_model.model.") and ".default." not in key for key in load_file(tmp_path / WEIGHTS_FILE))
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["method"]["name"] == name
    plain = PeftModel.from_pretrained(tiny().model, tmp_path).eval()
    assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, expected)
    assert torch.equal(load_adapter(tiny().model, tmp_path)(ids, attention_mask=mask).logits, expected)


def test_adapter_of_the_earlier_layout_still_loads(tiny, batch, tmp_path):
    """reft_lab.adapter/1: metadata in adapter_config.json, tensors under reft_lab's own names."""
    from safetensors.torch import save_file

    loaded = tiny()
    tuned = attach(loaded.model, {"name": "lora", "dropout": 0.0}, loaded.name)
    _train_steps(tuned)
    ids, mask, lengths = batch
    expected = tuned(ids, attention_mask=mask).logits
    save_adapter(tuned, tmp_path)
    metadata = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).unlink()
    (tmp_path / PEFT_CONFIG_FILE).write_text(json.dumps({**metadata, "format": LEGACY_FORMAT}))
    save_file({n: p.detach().contiguous() for n, p in tuned.trainable_state().items()}, tmp_path / WEIGHTS_FILE)
    assert torch.equal(load_adapter(tiny().model, tmp_path)(ids, attention_mask=mask).logits, expected)


def test_adapter_with_non_finite_tensors_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    save_adapter(attach(tiny().model, {"name": "loreft", "layers": [0]}), tmp_path)
    state = load_file(tmp_path / WEIGHTS_FILE)
    first = sorted(state)[0]
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, tmp_path / WEIGHTS_FILE)
    with pytest.raises(AdapterError, match=f"tensor {first} holds NaN or infinite values"):
        load_adapter(tiny().model, tmp_path)


def test_adapter_config_records_reft_fields(tiny, tmp_path):
    tuned = attach(tiny().model, {"name": "loreft", "rank": 3, "layers": [2], "positions": "f1+l2", "tied": True})
    save_adapter(tuned, tmp_path)
    method = json.loads((tmp_path / CONFIG_FILE).read_text())["method"]
    assert {k: method[k] for k in ("rank", "layers", "positions", "tied")} == {
        "rank": 3, "layers": [2], "positions": "f1+l2", "tied": True}


def test_mismatched_base_is_refused(tiny, tmp_path):
    save_adapter(attach(tiny("llama").model, {"name": "loreft", "layers": [0]}), tmp_path)
    other = tiny("llama").model
    with torch.no_grad():
        other.model.norm.weight.add_(1e-3)
    with pytest.raises(AdapterError, match="was trained on base 'tiny:llama'|trained on base"):
        load_adapter(other, tmp_path)
    with pytest.raises(AdapterError):
        load_adapter(tiny("qwen2").model, tmp_path)


def test_missing_and_corrupt_adapters(tiny, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tiny().model, tmp_path / "nope")
    save_adapter(attach(tiny().model, {"name": "loreft", "layers": [0]}), tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00" * 40)
    with pytest.raises(AdapterError, match="cannot be read"):
        load_adapter(tiny().model, tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(tiny().model, tmp_path)


@pytest.mark.parametrize("name,tied", [("loreft", False), ("loreft", True), ("direft", False), ("noreft", True)])
def test_pyreft_export_import_round_trip(tiny, batch, tmp_path, name, tied):
    ids, mask, lengths = batch
    tuned = attach(tiny().model, {"name": name, "rank": 4, "layers": [0, 2], "positions": "f2+l2", "tied": tied})
    _train_steps(tuned)
    expected = tuned(ids, attention_mask=mask, prompt_lengths=lengths).logits
    export_pyreft(tuned, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "config.json"
    restored = import_pyreft(tiny().model, tmp_path, positions="f2+l2")
    assert restored.config.tied == tied and restored.config.name == name
    torch.testing.assert_close(restored(ids, attention_mask=mask, prompt_lengths=lengths).logits, expected, atol=1e-5, rtol=1e-5)


def test_pyreft_saved_directory_imports_and_exports_for_pyreft(tiny, tmp_path):
    pyreft = pytest.importorskip("pyreft")
    T = 8
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": 4,
             "intervention": pyreft.LoreftIntervention(embed_dim=64, low_rank_dimension=4, dtype=torch.float32)}
            for layer in (1, 3) for _ in range(2)]
    theirs = pyreft.get_reft_model(tiny().model, pyreft.ReftConfig(representations=reps))
    theirs.save(str(tmp_path / "pyreft"))
    ids = torch.randint(3, 250, (2, T), generator=torch.Generator().manual_seed(5))
    locations = [[pos] * 2 for _ in (1, 3) for pos in ([0, 1], [T - 2, T - 1])]
    _, expected = theirs({"input_ids": ids}, unit_locations={"sources->base": (None, locations)})

    ours = import_pyreft(tiny().model, tmp_path / "pyreft", positions="f2+l2")
    torch.testing.assert_close(ours(ids).logits, expected.logits, atol=1e-5, rtol=1e-5)

    export_pyreft(ours, tmp_path / "back")
    reloaded = pyreft.ReftModel.load(str(tmp_path / "back"), tiny().model)
    ours_in_order = [ours.interventions[k] for k in ("layer1_first", "layer1_last", "layer3_first", "layer3_last")]
    for theirs_i, ours_i in zip(reloaded.interventions.values(), ours_in_order):
        torch.testing.assert_close(theirs_i.rotate_layer.weight, ours_i.R.T, atol=1e-6, rtol=0)
        # pyreft's loader builds W and b in bf16 (its default dtype): exact up to that rounding
        assert torch.equal(theirs_i.learned_source.weight, ours_i.W.detach().to(torch.bfloat16))
        assert torch.equal(theirs_i.learned_source.bias, ours_i.b.detach().to(torch.bfloat16))
        theirs_i.float()
    _, again = reloaded({"input_ids": ids}, unit_locations={"sources->base": (None, locations)})
    torch.testing.assert_close(again.logits, expected.logits, atol=5e-3, rtol=0)


def _saved_reft(tiny, directory, method, seed):
    loaded = tiny()
    torch.manual_seed(seed)
    tuned = attach(loaded.model, method, loaded.name)
    _train_steps(tuned)
    save_adapter(tuned, directory)
    return directory


BANK = {"layers": [1, 2], "positions": "f1+l2", "rank": 3}


def test_adapter_bank_edits_each_row_with_its_adapter(tiny, batch, tmp_path):
    from reft_lab.adapters import load_adapter_bank
    from reft_lab.errors import ConfigError

    dirs = [_saved_reft(tiny, tmp_path / "a", {"name": "loreft", **BANK}, 0),
            _saved_reft(tiny, tmp_path / "b", {"name": "direft", **BANK}, 1),
            _saved_reft(tiny, tmp_path / "c", {"name": "loreft", **BANK}, 2)]
    ids, mask, lengths = batch
    ids, mask, lengths = ids.repeat(2, 1), mask.repeat(2, 1), lengths.repeat(2)
    adapter_ids = torch.tensor([2, 0, 1, 2])
    served = load_adapter_bank(tiny().model, dirs)
    assert any(name.startswith("bank.") for name, _ in served.named_buffers()), "stacked factors move with the model"
    assert not any(name.startswith("bank.") for name in served.state_dict()), "and never enter a state dict"
    with torch.no_grad():
        logits = served(ids, attention_mask=mask, prompt_lengths=lengths, adapter_ids=adapter_ids).logits
        generated = served.generate(ids, attention_mask=mask, adapter_ids=adapter_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        for k, directory in enumerate(dirs):
            alone = load_adapter(tiny().model, directory)
            rows = adapter_ids == k
            want = alone(ids[rows], attention_mask=mask[rows], prompt_lengths=lengths[rows]).logits
            torch.testing.assert_close(logits[rows], want, atol=1e-5, rtol=1e-5)
            want_ids = alone.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=4, do_sample=False, pad_token_id=0)
            n = want_ids.shape[1]  # alone, a row can stop (end of sequence) before the batch does
            assert torch.equal(generated[rows][:, :n], want_ids) and not generated[rows][:, n:].any()
        base = tiny().model(ids, attention_mask=mask).logits
    assert not torch.allclose(logits, base, atol=1e-3), "the adapters must change the output"
    with pytest.raises(ConfigError, match="pass adapter_ids"):
        served(ids, attention_mask=mask)
    with pytest.raises(ConfigError, match=r"in \[0, 2\]"):
        served(ids, attention_mask=mask, adapter_ids=torch.tensor([0, 1, 3, 0]))


def test_adapter_bank_refuses_mixed_layouts_and_other_methods(tiny, tmp_path):
    from reft_lab.adapters import load_adapter_bank

    a = _saved_reft(tiny, tmp_path / "a", {"name": "loreft", **BANK}, 0)
    b = _saved_reft(tiny, tmp_path / "b", {"name": "loreft", **{**BANK, "layers": [0, 2]}}, 1)
    with pytest.raises(AdapterError, match=r"method.layers is \[0, 2\]"):
        load_adapter_bank(tiny().model, [a, b])
    save_adapter(attach(tiny().model, {"name": "lora"}), tmp_path / "lora")
    with pytest.raises(AdapterError, match="not a ReFT method"):
        load_adapter_bank(tiny().model, [a, tmp_path / "lora"])


def test_adapter_bank_takes_a_layer_span_and_the_list_of_its_layers_as_one_layout(tiny, tmp_path):
    from reft_lab.adapters import load_adapter_bank

    span = _saved_reft(tiny, tmp_path / "span", {"name": "loreft", **{**BANK, "layers": "spread:2"}}, 0)  # layers 1, 3 of 4
    listed = _saved_reft(tiny, tmp_path / "listed", {"name": "loreft", **{**BANK, "layers": [1, 3]}}, 1)
    served = load_adapter_bank(tiny().model, [span, listed])
    assert served.layer_ids == [1, 3] and len(served.bank) == 2 * 2  # 2 layers × 2 position groups


def test_generate_cli_loads_the_base_in_the_dtype_it_was_trained_in(tiny, tmp_path, capsys):
    from reft_lab.cli import main

    loaded = tiny("llama", "bfloat16")
    tuned = attach(loaded.model, {"name": "loreft", **BANK}, loaded.name)
    _train_steps(tuned)
    directory = str(save_adapter(tuned, tmp_path / "bf16"))
    assert read_adapter_config(directory)["base"]["dtype"] == "bfloat16"
    assert main(["generate", "--adapter", directory, "--max-new-tokens", "2", "hello"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "hello"
    assert main(["generate", "--adapter", directory, "--dtype", "float32", "hello"]) == 2
    err = capsys.readouterr().err
    assert "load the base in bfloat16, as it was trained (this one is float32)" in err and len(err.strip().splitlines()) == 1


def test_generate_cli_serves_several_adapters(tiny, tmp_path, capsys):
    from reft_lab.cli import main

    dirs = [str(_saved_reft(tiny, tmp_path / name, {"name": "loreft", **BANK}, seed)) for seed, name in enumerate("ab")]
    assert main(["generate", "--model", "tiny:llama", "--adapter", dirs[0], "--adapter", dirs[1], "--max-new-tokens", "3",
                 "hello", "what is 2+2?"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(line["adapter"], line["prompt"]) for line in lines] == [(d, p) for d in dirs for p in ("hello", "what is 2+2?")]
