"""Every method through the generic checks: one row per method (a new ReFT variant adds one row)."""

import pytest
import torch
from conftest import DEVICE, TINY_ARCHS

from reft_lab.accounting import fingerprint, param_report
from reft_lab.errors import ConfigError
from reft_lab.methods import attach, methods
from reft_lab.methods.reft import ReftConfig
from reft_lab.training import build_optimizer

pytestmark = pytest.mark.floor  # run again on the oldest transformers/peft (make test-floor)

METHOD_ROWS = [
    {"name": "loreft", "rank": 4, "layers": [1, 3], "positions": "f2+l2"},
    {"name": "direft", "rank": 4, "layers": "all", "positions": "f1+l1", "tied": True},
    {"name": "noreft", "rank": 2, "layers": [0], "positions": "l3"},
    {"name": "lora", "rank": 4, "alpha": 8},
    {"name": "dora", "rank": 4, "alpha": 8},
    {"name": "full"},
    {"name": "none"},
]


def test_every_registered_method_has_a_row():
    assert {row["name"] for row in METHOD_ROWS} == set(methods())


@pytest.mark.parametrize("device", sorted({"cpu", DEVICE}))
def test_optimizer_is_fused_on_cuda_only(tiny, device):
    """One fused AdamW launch per step on a GPU; the CPU keeps the default loop (and its results)."""
    tuned = attach(tiny(device=device).model, {"name": "loreft", "layers": [1, 2]})
    optimizer = build_optimizer(tuned, lr=1e-2, weight_decay=0.01)
    assert bool(optimizer.defaults.get("fused")) == (device == "cuda")
    before = {n: p.detach().clone() for n, p in tuned.trainable_state().items()}
    for p in tuned.trainable_state().values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in tuned.trainable_state().items())


def _train_steps(tuned, steps=2):
    tuned.train()
    opt = build_optimizer(tuned, lr=1e-2, weight_decay=0.01)
    ids = torch.randint(3, 250, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = tuned(ids, labels=ids, prompt_lengths=torch.tensor([5, 6])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    tuned.eval()


@pytest.mark.parametrize("row", METHOD_ROWS, ids=lambda r: r["name"])
def test_training_changes_exactly_the_trainable_state(tiny, row):
    loaded = tiny()
    base_before = fingerprint(loaded.model)
    tuned = attach(loaded.model, dict(row), loaded.name)
    trainable = {n: p.detach().clone() for n, p in tuned.trainable_state().items()}
    frozen = {n: p.detach().clone() for n, p in tuned.named_parameters() if not p.requires_grad}
    if row["name"] != "none":
        _train_steps(tuned)
    now = dict(tuned.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items()), "a frozen parameter moved"
    moved = [n for n, v in trainable.items() if not torch.equal(now[n], v)]
    assert len(moved) == len(trainable), f"trainable parameters that did not move: {set(trainable) - set(moved)}"
    changed_base = fingerprint(tuned.base_model) != base_before
    assert changed_base == (row["name"] == "full")
    if methods()[row["name"]].is_reft:
        assert all(n.startswith("interventions.") for n in trainable)
    if row["name"] in ("lora", "dora"):
        assert trainable and all("lora_" in n for n in trainable)


def test_full_fine_tuning_trains_a_bf16_base_as_its_fp32_copy(tiny):
    """AdamW steps on bf16 weights round away (at lr 2e-5, for every weight above ~0.01): full
    fine-tuning of a bf16 base trains exactly what training its fp32 copy trains, from the bf16 base's
    fingerprint (the base every method of a sweep shares)."""
    low = tiny(dtype="bfloat16").model
    base = fingerprint(low)
    ours, copy = attach(low, {"name": "full"}), attach(tiny(dtype="bfloat16").model.float(), {"name": "full"})
    assert ours.base_fingerprint == base and {p.dtype for p in ours.parameters()} == {torch.float32}
    for tuned in (ours, copy):
        _train_steps(tuned)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), copy.parameters()))
    as_loaded = attach(tiny(dtype="bfloat16").model, {"name": "full", "dtype": "bfloat16"})  # asked for: half the memory
    assert {p.dtype for p in as_loaded.parameters()} == {torch.bfloat16}
    with pytest.raises(ConfigError, match="method.dtype='bf16' is not allowed"):
        attach(tiny().model, {"name": "full", "dtype": "bf16"})


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("name", ["loreft", "lora"])
def test_forward_and_generate_on_every_architecture(tiny, batch, arch, name):
    loaded = tiny(arch)
    tuned = attach(loaded.model, {"name": name})
    ids, mask, lengths = batch
    logits = tuned(ids, attention_mask=mask, prompt_lengths=lengths).logits
    assert logits.shape == (2, 9, loaded.model.config.vocab_size) and torch.isfinite(logits).all()
    out = tuned.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 12)


def test_generate_edits_the_prompt_pass_only(tiny):
    """Greedy generation through the ReFT model equals manual greedy decoding where only the
    prompt forward is edited (decoding steps see the cache of the edited prompt)."""
    loaded = tiny()
    tuned = attach(loaded.model, {"name": "loreft", "rank": 4, "layers": [0, 2], "positions": "f1+l1"})
    with torch.no_grad():
        for p in tuned.interventions.parameters():
            p.add_(torch.randn_like(p))
    ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(3))
    got = tuned.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = tuned(ids, use_cache=True)
        seq, past = ids, out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(3):
            seq = torch.cat([seq, nxt], 1)
            step = tuned.model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = step.past_key_values, step.logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(got, seq)


def test_reft_accounting_formula(tiny):
    tuned = attach(tiny().model, {"name": "loreft", "rank": 3, "layers": [0, 1, 2], "positions": "f2+l2"})
    report = param_report(tuned)
    assert report.trainable_params == 3 * 2 * (2 * 3 * 64 + 3)
    assert report.base_params == sum(p.numel() for p in tiny().model.parameters())
    assert report.trainable_pct == pytest.approx(100 * report.trainable_params / report.base_params)


@pytest.mark.parametrize(
    "layers,n_layers,expected",
    [
        ("spread:4", 30, [3, 11, 18, 26]), ("spread:4", 4, [0, 1, 2, 3]), ("early:2", 30, [2, 7]),
        ("middle:2", 30, [12, 17]), ("late:2", 30, [22, 27]), ("late:1", 32, [26]), ("all", 3, [0, 1, 2]),
    ],
)
def test_layer_spans_spread_evenly_over_any_depth(layers, n_layers, expected):
    assert ReftConfig(layers=layers).layer_indices(n_layers) == expected


@pytest.mark.parametrize(
    "row,key",
    [
        ({"name": "loreft", "rank": 65}, "method.rank"),
        ({"name": "loreft", "rank": 0}, "method.rank"),
        ({"name": "loreft", "layers": [4]}, "method.layers"),
        ({"name": "loreft", "layers": [-1]}, "method.layers"),
        ({"name": "loreft", "layers": "some"}, "method.layers"),
        ({"name": "loreft", "layers": "late:0"}, "method.layers"),
        ({"name": "loreft", "layers": "late:3"}, "method.layers"),  # the tiny model's last third holds 1 layer
        ({"name": "loreft", "layers": "top:2"}, "method.layers"),
        ({"name": "loreft", "positions": "m3"}, "method.positions"),
        ({"name": "loreft", "dropout": 1.5}, "method.dropout"),
        ({"name": "loreft", "bogus": 1}, "method.bogus"),
        ({"name": "lora", "target_modules": ["not_a_module"]}, "method.target_modules"),
        ({"name": "lora", "alpha": -1}, "method.alpha"),
        ({"name": "magic"}, "method"),
    ],
)
def test_bad_method_configs_name_the_key(tiny, row, key):
    with pytest.raises(ConfigError) as err:
        attach(tiny().model, row)
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message


def test_model_without_decoder_layers_is_named(tiny):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny().model.config
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="decoder-layer list of Odd"):
        attach(Odd(), {"name": "loreft"})
