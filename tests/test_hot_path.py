"""The optimised training path equals the plain one; the prefix cache is invalidated when it must be."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

from reft_lab.accounting import fingerprint
from reft_lab.cli import main
from reft_lab.data.batching import EncodedExample, collate_train, position_ids, predicting_positions
from reft_lab.methods import attach
from reft_lab.training import response_loss
from reft_lab.training.prefix_cache import PrefixCache

pytestmark = pytest.mark.floor  # run again on the oldest transformers/peft (make test-floor)


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [EncodedExample(torch.randint(3, 250, (n,), generator=g).tolist(), torch.randint(3, 250, (r,), generator=g).tolist())
            for n, r in lengths]


def _fresh(tiny, method):
    torch.manual_seed(0)
    tuned = attach(tiny().model, method)
    return tuned.train()


def _grads(tuned):
    return {n: p.grad.detach().clone() for n, p in tuned.trainable_state().items()}


def _step_saving(tuned, batch, counted):
    """One loss and backward: (loss, gradients, how many tensors autograd saved for which ``counted``
    holds); the gradients are zeroed after."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = response_loss(tuned, batch)
    loss.backward()
    grads = _grads(tuned)
    tuned.zero_grad()
    return loss.detach(), grads, sum(1 for t in saved if counted(t))


def _full_logits_loss(tuned, batch):
    """The plain path: logits for every position, labels -100 outside the response."""
    logits = tuned(batch.input_ids, attention_mask=batch.attention_mask, prompt_lengths=batch.prompt_lengths,
                   use_cache=False).logits
    labels = torch.full_like(batch.input_ids, -100)
    for row, e in enumerate(batch.examples):  # left-padded: each response ends its row
        labels[row, labels.shape[1] - len(e.response):] = torch.tensor(e.response)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("method", [{"name": "loreft", "layers": [1, 3]}, {"name": "lora", "dropout": 0.0}], ids=["loreft", "lora"])
def test_response_only_logits_equal_full_logits(tiny, method):
    batch = collate_train(_examples([(7, 3), (9, 5), (4, 2)]), 0)
    a = _fresh(tiny, method)
    loss_a = response_loss(a, batch)
    loss_a.backward()
    b = _fresh(tiny, method)
    loss_b = _full_logits_loss(b, batch)
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    for name, grad in _grads(a).items():
        torch.testing.assert_close(grad, _grads(b)[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", [{"name": "loreft", "layers": [1, 2]}, {"name": "lora", "dropout": 0.0}], ids=["loreft", "lora"])
def test_gradient_checkpointing_equal_losses_and_gradients(tiny, method):
    batch = collate_train(_examples([(7, 3), (9, 5), (4, 2)]), 0)
    results = []
    for checkpointing in (False, True):
        tuned = _fresh(tiny, method)
        if checkpointing:
            tuned.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            tuned.train()
        loss = response_loss(tuned, batch)
        loss.backward()
        results.append((loss.detach(), _grads(tuned)))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-7, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_compiled_layers_equal_losses_and_gradients(tiny, impl):
    """trainer.compile: the same losses and gradients as the plain blocks; with impl=triton the fused
    kernel edits the compiled blocks' outputs in place between them (what trainer.compile runs on CUDA)."""
    from reft_lab.models.layers import decoder_layers
    from reft_lab.training.speedups import compiled_layers

    batches = [collate_train(_examples(lengths, seed), 0) for seed, lengths in enumerate([[(7, 3), (9, 5)], [(12, 4), (5, 2)]])]
    results, graphs = [], []
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()  # they outlive reset(): another compiling test in this process counted there
    for compiled in (False, True):
        tuned = _fresh(tiny, {"name": "loreft", "layers": [1, 2], "impl": impl})
        with compiled_layers(tuned.base_model) if compiled else torch.enable_grad():
            for batch in batches:  # two padded shapes: the second must reuse the shape-generic graphs
                loss = response_loss(tuned, batch)
                loss.backward()
                results.append((compiled, loss.detach(), _grads(tuned)))
                tuned.zero_grad()
                graphs.append(counters["stats"]["unique_graphs"])
        assert all("forward" not in block.__dict__ for block in decoder_layers(tuned.base_model)), "compile left behind"
        assert not any(block._forward_pre_hooks for block in decoder_layers(tuned.base_model)), "shape hints left behind"
    assert graphs == [0, 0, 2, 2], graphs  # blocks without and with an input gradient; no recompile
    plain, fused = [r for r in results if not r[0]], [r for r in results if r[0]]
    for (_, loss_p, grads_p), (_, loss_c, grads_c) in zip(plain, fused):
        torch.testing.assert_close(loss_c, loss_p, atol=1e-5, rtol=1e-5)
        for name, grad in grads_p.items():
            torch.testing.assert_close(grads_c[name], grad, atol=1e-5, rtol=1e-4)


def test_prefix_cache_equal_losses_and_gradients(tiny):
    examples = _examples([(7, 3), (9, 5), (4, 2), (6, 4)])
    first, second = collate_train(examples[:2] + examples[2:3], 0), collate_train([examples[2], examples[0], examples[1]], 0)
    plain = _fresh(tiny, {"name": "loreft", "layers": [2, 3]})
    cached = _fresh(tiny, {"name": "loreft", "layers": [2, 3]})
    cache = PrefixCache(2**30)
    cache.bind(cached.model, 2, fingerprint(cached.base_model))

    def run(tuned, batch, use_cache):
        with cache.around_batch(batch) if use_cache else torch.enable_grad():
            loss = response_loss(tuned, batch)
        loss.backward()
        grads = _grads(tuned)
        tuned.zero_grad()
        return loss.detach(), grads

    run(cached, first, True)  # fills the cache (other batch composition, other padding)
    assert (cache.hits, cache.misses) == (0, 1)
    loss_c, grads_c = run(cached, second, True)
    assert cache.hits == 1, "the second batch should come from the cache"
    loss_p, grads_p = run(plain, second, False)
    torch.testing.assert_close(loss_c, loss_p, atol=1e-5, rtol=1e-5)
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_c[name], grad, atol=1e-5, rtol=1e-4)


def test_prefix_cache_invalidation(tiny, tmp_path):
    tuned = attach(tiny().model, {"name": "loreft", "layers": [2]})
    cache = PrefixCache(max_bytes=10_000, spill_dir=tmp_path / "spill")
    cache.bind(tuned.model, 2, "fingerprint-a")
    batch = collate_train(_examples([(30, 10), (30, 10), (20, 5)]), 0)  # 3 × ~40 × 64 floats > 10 kB: spills
    keys = [PrefixCache.key(e.prompt + e.response) for e in batch.examples]
    with cache.around_batch(batch):
        tuned(batch.input_ids, attention_mask=batch.attention_mask)
    assert cache.memory and cache.on_disk and cache.bytes <= 10_000
    assert all(cache._get(k) is not None for k in keys)
    cache.bind(tuned.model, 2, "fingerprint-a")  # same model and layer: kept
    assert all(cache._get(k) is not None for k in keys)
    cache.bind(tuned.model, 3, "fingerprint-a")  # layers changed
    assert not cache.memory and not cache.on_disk and not list((tmp_path / "spill").iterdir())
    cache.bind(tuned.model, 2, "fingerprint-b")  # model changed
    assert all(cache._get(k) is None for k in keys)
    other = [PrefixCache.key(e.prompt + e.response) for e in _examples([(30, 10)], seed=9)]
    assert other[0] not in keys  # new data: a new key, a miss


def test_bench_runs_on_a_tiny_model(tmp_path, capsys):
    assert main(["bench", "--model", "tiny:llama", "--layers", "1", "2", "--warmup", "0", "--steps", "2", "--memory-steps",
                 "1", "--providers", "reft_lab_loreft", "pyreft_loreft", "peft_lora", "floor", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "train_step.jsonl").read_text().splitlines()[-1])
    assert set(record["providers"]) == {"reft_lab_loreft", "pyreft_loreft", "peft_lora", "floor"}
    assert all(v["median_s"] > 0 for v in record["providers"].values())
    assert "reft_lab_loreft/pyreft_loreft_step" in record["ratios"] and "reft_lab_loreft/floor_step" in record["ratios"]
    assert set(record["paired_step_ratios"]) == {"reft_lab_loreft/pyreft_loreft_step", "reft_lab_loreft/peft_lora_step",
                                                 "reft_lab_loreft/floor_step"}
    assert {p: len(t) for p, t in record["times_s"].items()} == {p: 2 for p in record["providers"]}
    assert (tmp_path / "train_step.csv").read_text().count("\n") == 5


def test_bench_bf16_base_on_any_device_and_config_a_after_it(tmp_path, capsys):
    """``--bf16-base`` makes a scale's frozen base bf16 here too (the GPU scales' setting, for memory
    on a CPU); a later run without it is config A's fp32 workload again in the same process."""
    import reft_lab.bench as bench

    try:
        assert main(["bench", "--scale", "smol_host", "--bf16-base", "--providers", "reft_lab_loreft", "floor", "--warmup", "0",
                     "--steps", "1", "--memory-steps", "1", "--out", str(tmp_path)]) == 0
        record = json.loads((tmp_path / "train_step.jsonl").read_text().splitlines()[-1])
        assert record["config"]["bf16_base"] is True and record["config"]["batch"] == 8
        assert all(v["peak_train_bytes"] > 0 for v in record["providers"].values())
        assert bench._model("scale:smol_host").dtype == torch.bfloat16  # the builder every provider uses
        assert main(["bench", "--model", "tiny:llama", "--layers", "1", "2", "--warmup", "0", "--ops", "--providers", "floor"]) == 0
        assert bench.BF16_BASE["on"] is False and (bench.BATCH, bench.PROMPT) == (8, 48)
    finally:
        bench.set_scale("smol_A")
        bench.LAYERS[:] = [6, 12, 18, 24]
    capsys.readouterr()
    assert main(["bench", "--bf16-base", "--providers", "floor"]) == 2
    assert "--bf16-base is not allowed without --scale" in capsys.readouterr().err


def test_bench_needed_flops_match_a_hand_count():
    """The FLOPs a step needs (for MFU): the floor provider, the plain model with the activation
    backward from the lowest edited layer, runs in ``test_bench_runs_on_a_tiny_model``."""
    from transformers import LlamaConfig

    import reft_lab.bench as bench

    bench.set_scale("smol_A")  # batch 8 × (48 + 16), layers from 6
    try:
        config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=10, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=100)
        tokens = 8 * 64
        layer = 2 * tokens * (2 * 64 + 2 * 8 * 4 + 3 * 8 * 16) + 4 * 8 * 64 * 64 * 8
        head = 2 * 8 * 16 * 8 * 100
        assert bench.needed_flops(config, "reft_lab_loreft") == (10 * layer + head) + (4 * layer + head)
        assert bench.needed_flops(config, "peft_lora") == 2 * (10 * layer + head)
    finally:
        bench.set_scale("smol_A")
        bench.LAYERS[:] = [6, 12, 18, 24]


def test_bench_ratios_of_medians_and_paired_per_round():
    from reft_lab.bench import ratios

    times = {"reft_lab_loreft": [1.0, 3.0, 3.0], "pyreft_loreft": [2.0, 2.5, 6.0]}
    of_medians, paired = ratios(times, {"reft_lab_loreft": 30, "pyreft_loreft": 60})
    assert of_medians == {"reft_lab_loreft/pyreft_loreft_step": 3.0 / 2.5, "reft_lab_loreft/pyreft_loreft_memory": 0.5}
    assert paired == {"reft_lab_loreft/pyreft_loreft_step": 0.5}  # rounds: 0.5, 1.2, 0.5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block,max_blocks", [(2**20, 32), (600, 32), (600, 3)], ids=["one-block", "2-rows-a-block", "3-blocks"])
def test_blocked_loss_keeps_no_log_probabilities_same_gradients(tiny, monkeypatch, dtype, block, max_blocks):
    """The loss in blocks of rows equals autograd's plain cross-entropy over all rows: every gradient
    bit for bit, the loss to float rounding; and no [N, V] fp32 log-probabilities stay for backward."""
    import reft_lab.training.loss as loss_module

    batch = collate_train(_examples([(7, 3), (9, 5), (4, 2)]), 0)  # 10 scored rows of 259 logits
    torch.manual_seed(0)
    tuned = attach(tiny("llama", dtype=dtype).model, {"name": "loreft", "layers": [1]}).train()
    for name in ("BLOCK_ELEMENTS", "GPU_BLOCK_ELEMENTS"):
        monkeypatch.setattr(loss_module.BlockedCrossEntropy, name, block)
    monkeypatch.setattr(loss_module.BlockedCrossEntropy, "MAX_BLOCKS", max_blocks)
    vocab = tuned.base_model.config.vocab_size
    expected_blocks = 1 if block == 2**20 else 5 if max_blocks == 32 else 3
    assert len(loss_module.BlockedCrossEntropy._blocks(torch.empty(10, vocab))) == expected_blocks

    def fp32_logit_matrices(t):
        return t.dtype == torch.float32 and t.shape == (len(batch.targets), vocab)

    loss, grads, saved = _step_saving(tuned, batch, fp32_logit_matrices)
    monkeypatch.setattr(loss_module.BlockedCrossEntropy, "apply",  # what autograd alone does
                        lambda logits, targets: F.cross_entropy(logits.float(), targets, reduction="sum"))
    loss_plain, grads_plain, saved_plain = _step_saving(tuned, batch, fp32_logit_matrices)
    torch.testing.assert_close(loss, loss_plain, rtol=1e-6, atol=0)  # block sums, added in another order
    assert all(torch.equal(grads[name], grad) for name, grad in grads_plain.items())
    # plain: the log-probabilities (log_softmax and nll_loss each save them); blocked: fp32 logits
    # keep themselves instead (same bytes), bf16 logits keep no fp32 matrix at all
    assert saved_plain == 2 and saved == (1 if dtype == "float32" else 0)


def test_blocked_loss_of_no_scored_rows_is_zero():
    from reft_lab.training.loss import BlockedCrossEntropy

    logits = torch.randn(0, 7, requires_grad=True)
    loss = BlockedCrossEntropy.apply(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (0, 7)


def test_loss_benchmark_prints_both_losses_for_both_dtypes(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("loss_blocks", Path(__file__).parents[1] / "experiments" / "bench" / "loss_blocks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--rows", "4", "--vocab", "10", "--rounds", "1", "--device", DEVICE]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["float32", "bfloat16"]
    assert all("plain" in line and "blocked" in line for line in lines)


def test_length_grouped_batches_are_a_sorted_permutation():
    from reft_lab.training import BatchStream

    data = _examples([(int(n), 2) for n in torch.randint(2, 40, (30,), generator=torch.Generator().manual_seed(1))])
    plain = BatchStream(data, 4, 0, seed=0)
    grouped = BatchStream(data, 4, 0, seed=0, group_by_length=True)
    assert sorted(grouped.order()) == sorted(plain.order()) == list(range(30))
    lengths = [len(data[i].prompt) for i in grouped.order()]
    assert lengths == sorted(lengths, reverse=True)  # one window (50 batches) covers all 30
    batch = next(grouped)
    assert batch.input_ids.shape[1] == max(len(e.prompt) + 2 for e in data)


def test_continuation_logprobs_equal_full_logits(tiny):
    from reft_lab.data.batching import PromptEncoder, left_pad
    from reft_lab.evaluation.generation import continuation_logprobs

    loaded = tiny()
    tuned = attach(loaded.model, {"name": "loreft", "layers": [1]}).eval()
    examples = _examples([(7, 3), (9, 5), (4, 1), (6, 4)])
    prompts, continuations = [e.prompt for e in examples], [e.response for e in examples]
    got = continuation_logprobs(tuned, PromptEncoder(loaded.tokenizer), prompts, continuations, batch_size=3)
    for prompt, continuation, logprobs in zip(prompts, continuations, got):
        ids, mask = left_pad([prompt + continuation], 0)
        with torch.no_grad():
            logits = tuned(ids, attention_mask=mask, prompt_lengths=torch.tensor([len(prompt)]), use_cache=False).logits
        expected = torch.log_softmax(logits[0, -len(continuation) - 1:-1].float(), -1)
        torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary and absolute position embeddings
@pytest.mark.parametrize("method", [{"name": "loreft", "layers": [1, 2], "positions": "f1+l2"}, {"name": "lora", "dropout": 0.0}],
                         ids=["loreft", "lora"])
def test_option_scores_equal_teacher_forcing_each_option(tiny, method, arch):
    """Sharing a prompt's KV cache among its options gives the full sequence's log-likelihoods,
    although the two paths pad differently."""
    from reft_lab.data.batching import PromptEncoder
    from reft_lab.evaluation.generation import continuation_logprobs, option_scores

    loaded = tiny(arch)
    tuned = _fresh(lambda: loaded, method).eval()
    with torch.no_grad():
        for p in tuned.trainable_state().values():  # a visible edit: random, not the zero-ish init
            p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (6, 9, 4)]
    options = [[torch.randint(3, 250, (k,), generator=g).tolist() for k in lengths] for lengths in ([1, 3, 2], [2, 2], [4, 1, 1, 3])]
    encoder = PromptEncoder(loaded.tokenizer)
    got = option_scores(tuned, encoder, prompts, options, batch_size=2)
    flat_prompts = [p for p, opts in zip(prompts, options) for _ in opts]
    flat_options = [o for opts in options for o in opts]
    logprobs = continuation_logprobs(tuned, encoder, flat_prompts, flat_options, batch_size=3)
    want = [float(lp.gather(1, torch.tensor(o)[:, None]).sum()) for lp, o in zip(logprobs, flat_options)]
    assert [len(s) for s in got] == [len(o) for o in options]
    assert sum(got, []) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_response_loss_does_not_depend_on_padding(tiny, arch):
    """Positions count attended tokens only, so a left-padded row trains as it would alone (GPT-2's
    absolute position embeddings would otherwise shift with the padding)."""
    examples = _examples([(5, 3), (14, 4)])
    tuned = attach(tiny(arch).model, {"name": "loreft", "layers": [1]}).eval()  # GPT-2's dropout off
    alone = response_loss(tuned, collate_train(examples[:1], 0))
    together = collate_train(examples, 0)  # the first row is now left-padded by 10
    per_row = [response_loss(tuned, collate_train([e], 0)) * len(e.response) for e in examples]
    torch.testing.assert_close(response_loss(tuned, together), sum(per_row) / sum(len(e.response) for e in examples),
                               atol=1e-5, rtol=1e-5)
    assert together.attention_mask[0].sum() < together.attention_mask.shape[1] and alone.isfinite()


def test_bench_profile_prints_the_op_table(capsys):
    assert main(["bench", "--model", "tiny:llama", "--layers", "1", "2", "--warmup", "1", "--profile", "reft_lab_loreft"]) == 0
    out = capsys.readouterr().out
    assert "aten::mm" in out and "Self CPU time total" in out


def test_bench_ops_counts_each_providers_dispatched_ops(capsys):
    assert main(["bench", "--model", "tiny:llama", "--layers", "1", "2", "--warmup", "1", "--ops",
                 "--providers", "reft_lab_loreft", "floor"]) == 0
    counts = json.loads(capsys.readouterr().out)["aten_ops_per_step"]
    # the edit and its optimizer state cost ops beyond the plain base's forward and backward
    assert set(counts) == {"reft_lab_loreft", "floor"} and counts["reft_lab_loreft"] > counts["floor"] > 100


def test_bench_layers_apply_to_a_scale_too(capsys):
    """``--layers`` with ``--scale``: the scale sets its layers first, the flag wins (backward from
    layer 1 of smol_host's 30 costs more ops than from the scale's layer 6)."""
    import reft_lab.bench as bench

    counts = []
    try:
        for layers in ([], ["--layers", "1", "2"]):
            assert main(["bench", "--scale", "smol_host", *layers, "--warmup", "0", "--ops", "--providers", "reft_lab_loreft"]) == 0
            counts.append(json.loads(capsys.readouterr().out)["aten_ops_per_step"]["reft_lab_loreft"])
            assert bench.LAYERS == ([1, 2] if layers else [6, 12, 18, 24])
    finally:
        bench.set_scale("smol_A")
        bench.LAYERS[:] = [6, 12, 18, 24]
    assert counts[1] > counts[0]


@pytest.mark.parametrize("device", sorted({"cpu", DEVICE}))
def test_prefix_cache_entries_are_copies_of_their_rows_on_the_model_device(tiny, device):
    tuned = attach(tiny(device=device).model, {"name": "loreft", "layers": [2]})
    cache = PrefixCache(2**30, dtype=torch.bfloat16)
    cache.bind(tuned.model, 2, "fp")
    examples = _examples([(9, 3), (5, 2)])
    batch = collate_train([examples[0], examples[1], examples[0]], 0).to(device)  # one example twice
    with cache.around_batch(batch):
        tuned(batch.input_ids, attention_mask=batch.attention_mask)
    assert len(cache.memory) == 2
    for entry, example in zip(cache.memory.values(), examples):
        assert entry.device.type == device and entry.dtype == torch.bfloat16
        assert entry.shape == (len(example.prompt) + len(example.response), 64)
        # its own storage: a view into the batch would keep all of it alive behind the byte count
        assert entry.untyped_storage().nbytes() == entry.numel() * entry.element_size()
    assert cache.bytes == sum(e.numel() * e.element_size() for e in cache.memory.values())
    assert "0 of 1 batches skipped layers 0-1 (2 examples" in cache.summary()


def test_stochastic_prefix_names_the_dropout_below_the_layer(tiny):
    from reft_lab.models.layers import decoder_layers
    from reft_lab.training.prefix_cache import stochastic_prefix

    assert "p=0.1" in stochastic_prefix(tiny("gpt2").model, 1)  # GPT-2: embedding and block dropout
    llama = tiny().model
    assert stochastic_prefix(llama, 2) is None
    decoder_layers(llama)[2].self_attn.attention_dropout = 0.1  # feeds layer 3's input, not layer 2's
    assert stochastic_prefix(llama, 2) is None
    assert stochastic_prefix(llama, 3) == "model.layers.2.self_attn: p=0.1"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_uses_the_prefix_cache_by_default_unless_dropout_feeds_it(tmp_path, capsys, arch):
    args = ["train", "model=tiny", f"model.name_or_path=tiny:{arch}", "trainer=smoke", "method=loreft",
            "method.layers=[2]", "task.train_size=8", "trainer.max_steps=5", "retention.knowledge_probe=2",
            "retention.kl_prompts=2", "retention.leakage_prompts=2", "task.test_size=2", "logger=none",
            f"hydra.run.dir={tmp_path}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    if arch == "llama":  # 8 examples in batches of 4: steps 3-5 are epochs 2-3
        assert "prefix cache: 3 of 5 batches skipped layers 0-1 (8 examples" in out
    else:
        assert "trainer.prefix_cache is off for this model: dropout below the lowest intervened layer" in out


@pytest.mark.parametrize("arch,expected", [("llama", 4), ("qwen2", 4), ("gpt2", 0), ("gpt_neox", 0)])
def test_gated_mlps_are_found_by_their_forward(tiny, arch, expected):
    from reft_lab.training.recompute import gated_mlps

    assert len(gated_mlps(tiny(arch).model)) == expected


@pytest.mark.parametrize("method,saved", [
    ({"name": "loreft", "layers": [1, 2]}, (3 * 2, 2 * 2)),  # per layer with grad (2, 3): gate and up, not act(gate)
    ({"name": "lora", "dropout": 0.0, "target_modules": ["gate_proj", "up_proj"]}, (3 * 4, 2 * 4)),  # wrapped linears
    ({"name": "full"}, (3 * 4, 2 * 4)),  # weight gradients too
], ids=["loreft", "lora-on-the-mlp", "full"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])  # SiLU's own backward op; any other act through autograd
def test_lean_gated_mlps_same_losses_and_gradients_less_saved_memory(tiny, method, saved, act, monkeypatch):
    from reft_lab.models.layers import decoder_layers
    from reft_lab.training.recompute import lean_gated_mlps

    batch = collate_train(_examples([(7, 3), (9, 5), (4, 2)]), 0)
    tuned = _fresh(tiny, method)
    if act == "gelu_tanh":
        for layer in decoder_layers(tuned.base_model):
            layer.mlp.act_fn = torch.nn.GELU(approximate="tanh")
    nested = []
    grad = torch.autograd.grad

    def counted_grad(*args, **kwargs):  # the MLP's nested calls differentiate act(gate): [..., intermediate]
        outputs = args[0] if args else kwargs["outputs"]
        output = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        nested.append(output.shape[-1] if output.dim() else None)  # the loss's own calls: scalars
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counted_grad)

    activation = (*batch.input_ids.shape, tuned.base_model.config.intermediate_size)  # [B, T, intermediate]

    def run():
        return _step_saving(tuned, batch, lambda t: t.shape == activation)

    loss_plain, grads_plain, saved_plain = run()
    with lean_gated_mlps(tuned.base_model) as swapped:
        assert swapped == 4
        loss_lean, grads_lean, saved_lean = run()
    assert all("forward" not in layer.mlp.__dict__ for layer in decoder_layers(tuned.base_model)), "not restored"
    assert torch.equal(loss_lean, loss_plain)
    assert all(torch.equal(grads_lean[name], grad) for name, grad in grads_plain.items())
    assert (saved_plain, saved_lean) == saved
    intermediate = tuned.base_model.config.intermediate_size
    assert nested.count(intermediate) == (0 if act == "silu" else saved[1] // 2)  # a nested autograd call per MLP with a gradient


@pytest.mark.parametrize("method", [
    {"name": "loreft", "layers": [1, 2]},
    {"name": "lora", "dropout": 0.0, "target_modules": ["gate_proj", "up_proj"]},  # recomputed through the wrapped linears
    {"name": "full"},
], ids=["loreft", "lora-on-the-mlp", "full"])
def test_recompute_mlp_same_losses_and_gradients_no_mlp_activation_saved(tiny, method):
    from reft_lab.models.layers import decoder_layers
    from reft_lab.training.recompute import lean_gated_mlps

    batch = collate_train(_examples([(7, 3), (9, 5), (4, 2)]), 0)
    tuned = _fresh(tiny, method)
    activation = (*batch.input_ids.shape, tuned.base_model.config.intermediate_size)  # [B, T, intermediate]

    def run():
        return _step_saving(tuned, batch, lambda t: t.shape == activation)

    loss_plain, grads_plain, saved_plain = run()
    with lean_gated_mlps(tuned.base_model, recompute_projections=True) as swapped:
        assert swapped == 4
        loss_lean, grads_lean, saved_lean = run()
    assert all("forward" not in layer.mlp.__dict__ for layer in decoder_layers(tuned.base_model)), "not restored"
    assert torch.equal(loss_lean, loss_plain)
    assert all(torch.equal(grads_lean[name], grad) for name, grad in grads_plain.items())
    assert saved_plain > 0 and saved_lean == 0  # gate, act(gate) and up: none kept from forward to backward


@pytest.mark.parametrize("arch,dtype,method,expected", [
    ("llama", "bfloat16", {"name": "loreft", "layers": [1, 2]}, 9),  # two per layer and the final norm
    ("qwen2", "float16", {"name": "lora", "dropout": 0.0}, 9),
    ("llama", "float32", {"name": "loreft", "layers": [1, 2]}, 0),  # no upcast to drop
    ("llama", "bfloat16", {"name": "full", "dtype": "bfloat16"}, 0),  # trainable norm weights keep their plain forward
    ("gpt2", "bfloat16", {"name": "loreft", "layers": [1, 2]}, 0),  # LayerNorms fail the probe
    ("gpt_neox", "bfloat16", {"name": "loreft", "layers": [1, 2]}, 0),
])
def test_frozen_rms_norms_are_found_by_their_forward_and_gradient(tiny, arch, dtype, method, expected):
    from reft_lab.training.recompute import frozen_rms_norms

    torch.manual_seed(0)
    assert len(frozen_rms_norms(attach(tiny(arch, dtype=dtype).model, method).base_model)) == expected


@pytest.mark.parametrize("method", [{"name": "loreft", "layers": [1, 2]}, {"name": "lora", "dropout": 0.0}], ids=["loreft", "lora"])
def test_lean_rms_norms_same_losses_and_gradients_no_fp32_copies_saved(tiny, method):
    from reft_lab.training.recompute import lean_rms_norms

    batch = collate_train(_examples([(7, 3), (9, 5), (4, 2)]), 0)
    torch.manual_seed(0)
    tuned = attach(tiny("llama", dtype="bfloat16").model, method).train()
    hidden = (*batch.input_ids.shape, tuned.base_model.config.hidden_size)

    def run():
        return _step_saving(tuned, batch, lambda t: t.shape == hidden and t.dtype == torch.float32)

    loss_plain, grads_plain, upcasts_plain = run()
    with lean_rms_norms(tuned.base_model) as swapped:
        assert swapped == 9
        loss_lean, grads_lean, upcasts_lean = run()
    assert all("forward" not in module.__dict__ for module in tuned.base_model.modules()), "not restored"
    assert torch.equal(loss_lean, loss_plain)
    assert all(torch.equal(grads_lean[name], grad) for name, grad in grads_plain.items())
    # each norm with a gradient saved its [B, T, d] fp32 upcast twice (for pow and for the product):
    # LoReFT at layers 1-2 backpropagates through layers 2-3 and the final norm; LoRA through every
    # norm but the first, whose input (the embeddings) needs no gradient
    assert (upcasts_plain, upcasts_lean) == ((2 * 5, 0) if method["name"] == "loreft" else (2 * 8, 0))


def test_resume_fingerprint_ignores_memory_switches_that_keep_the_numbers():
    from dataclasses import replace

    from reft_lab.config import compose
    from reft_lab.settings import RunSettings, config_fingerprint, run_config

    base = RunSettings.from_cfg(compose(["model=tiny", "trainer=smoke", "method=loreft"]))
    same = [{"gradient_checkpointing": True}, {"recompute_mlp_act": False}, {"recompute_mlp": True},
            {"recompute_norm_upcast": False}, {"prefix_cache_gb": 1.0}]
    for change in same:
        assert config_fingerprint(replace(base, trainer=replace(base.trainer, **change))) == config_fingerprint(base), change
    for change in [{"prefix_cache": False}, {"compile": True}, {"batch_size": 2}, {"pad_to_multiple": 8}]:  # these change numbers
        assert config_fingerprint(replace(base, trainer=replace(base.trainer, **change))) != config_fingerprint(base), change
    # CUDA graphs replay the compiled kernels (same numbers), but pad to 64 unless told otherwise (not the same)
    compiled = replace(base, trainer=replace(base.trainer, compile=True))
    graphs = replace(base, trainer=replace(base.trainer, compile=True, cuda_graphs=True))
    assert config_fingerprint(graphs) != config_fingerprint(compiled)
    assert config_fingerprint(replace(graphs, trainer=replace(graphs.trainer, pad_to_multiple=1))) == config_fingerprint(compiled)
    # a multiple of 1 is how every run padded before the option: their checkpoints still resume
    assert config_fingerprint(replace(base, trainer=replace(base.trainer, pad_to_multiple=1))) == config_fingerprint(base)
    # full fine-tuning's method.dtype: null is how it ran before the option; bfloat16 changes the numbers
    full = RunSettings.from_cfg(compose(["model=tiny", "trainer=smoke", "method=full"]))
    assert "dtype" not in run_config(full)["method"]
    assert config_fingerprint(replace(full, method=replace(full.method, dtype="bfloat16"))) != config_fingerprint(full)


def test_cuda_graphs_are_refused_without_compile_or_cuda(tmp_path, capsys):
    overrides = ["model=tiny", "model.device=cpu", "trainer=smoke", "logger=none", f"hydra.run.dir={tmp_path}"]
    for extra, needle in ((["trainer.cuda_graphs=true"], "unless trainer.compile=true"),
                          (["trainer.cuda_graphs=true", "trainer.compile=true", "trainer.gradient_checkpointing=true"],
                           "with trainer.gradient_checkpointing=true"),
                          (["trainer.cuda_graphs=true", "trainer.compile=true"], "with the model on cpu")):
        assert main(["train", *overrides, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "trainer.cuda_graphs=True is not allowed" in err[0] and needle in err[0], err
    assert not (tmp_path / "metrics.json").exists()


def test_training_with_recompute_mlp_ends_at_the_same_loss_and_refuses_compile(tmp_path, capsys):
    overrides = ["model=tiny", "model.device=cpu", "trainer=smoke", "method=loreft", "method.layers=[1,2]", "logger=none",
                 "trainer.prefix_cache=false", "retention.knowledge_probe=2", "retention.kl_prompts=2",
                 "retention.leakage_prompts=2", "task.test_size=2"]
    losses = []
    for extra in ([], ["trainer.recompute_mlp=true"]):
        run_dir = tmp_path / str(len(losses))
        assert main(["train", *overrides, *extra, f"hydra.run.dir={run_dir}"]) == 0
        losses.append(json.loads((run_dir / "metrics.json").read_text())["final_loss"])
    assert losses[0] == losses[1]
    capsys.readouterr()
    assert main(["train", *overrides, "trainer.recompute_mlp=true", "trainer.compile=true", f"hydra.run.dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer.recompute_mlp=True is not allowed" in err[0] and "trainer.compile=true" in err[0], err


def test_batches_padded_to_a_multiple_give_the_same_loss(tiny):
    examples = _examples([(7, 3), (9, 5), (4, 2)])
    tuned = _fresh(tiny, {"name": "loreft", "layers": [1, 3]})
    plain, padded = collate_train(examples, 0), collate_train(examples, 0, length_multiple=16)
    assert plain.input_ids.shape[1] == 14 and padded.input_ids.shape[1] == 16
    assert padded.attention_mask.sum() == plain.attention_mask.sum() and padded.targets.tolist() == plain.targets.tolist()
    torch.testing.assert_close(response_loss(tuned, padded), response_loss(tuned, plain), atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_equal_the_compiled_blocks_losses_and_gradients(tiny):
    """Replaying the compiled blocks as CUDA graphs (fused edits between them, in place on the graphs'
    outputs) gives the compiled path's losses and gradients, over steps and two batch shapes."""
    from reft_lab.training.speedups import compiled_layers

    batches = [collate_train(_examples(lengths, seed), 0, length_multiple=8).to(DEVICE)
               for seed, lengths in enumerate([[(7, 3), (9, 5)], [(12, 4), (5, 2)], [(6, 3), (8, 4)]])]
    results = {}
    for cuda_graphs in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        tuned = attach(tiny(device=DEVICE).model, {"name": "loreft", "layers": [1, 2], "impl": "auto"}).train()
        results[cuda_graphs] = []
        with compiled_layers(tuned.base_model, cuda_graphs):
            for _ in range(3):  # warm-up, capture, replay
                for batch in batches:
                    torch.compiler.cudagraph_mark_step_begin()
                    loss = response_loss(tuned, batch)
                    loss.backward()
                    results[cuda_graphs].append((loss.detach().clone(), _grads(tuned)))
                    tuned.zero_grad()
    for (loss_c, grads_c), (loss_g, grads_g) in zip(results[False], results[True]):
        torch.testing.assert_close(loss_g, loss_c, atol=1e-5, rtol=1e-5)
        for name, grad in grads_c.items():
            torch.testing.assert_close(grads_g[name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", [{"name": "loreft", "layers": [1, 2]}, {"name": "lora", "dropout": 0.0}], ids=["loreft", "lora"])
def test_scoring_needs_no_more_than_an_integer_logits_to_keep(tiny, method, monkeypatch):
    """transformers before 5.23 index ``hidden_states[:, logits_to_keep, :]``: a [B, T] boolean
    raises there. Loss, teacher-forced log-probs and option scores must run on such a model."""
    from reft_lab.data.batching import PromptEncoder
    from reft_lab.evaluation.generation import continuation_logprobs, option_scores

    loaded = tiny()
    cls = type(loaded.model)
    current = cls.forward

    def older(self, *args, logits_to_keep=0, **kwargs):
        if not isinstance(logits_to_keep, int):
            raise IndexError("too many indices for tensor of dimension 3")  # what 4.56 to 5.22 raise
        return current(self, *args, logits_to_keep=logits_to_keep, **kwargs)

    monkeypatch.setattr(cls, "forward", older)
    tuned = _fresh(lambda: loaded, method)
    examples = _examples([(7, 3), (9, 5)])
    assert response_loss(tuned, collate_train(examples, 0)).isfinite()
    tuned.eval()
    encoder = PromptEncoder(loaded.tokenizer)
    prompts = [e.prompt for e in examples]
    assert [lp.shape[0] for lp in continuation_logprobs(tuned, encoder, prompts, [e.response for e in examples], 2)] == [3, 5]
    assert [len(s) for s in option_scores(tuned, encoder, prompts, [[[5, 6], [7]], [[8, 9, 10]]], 2)] == [2, 1]


def test_collated_scored_positions_are_the_response_predicting_ones():
    examples = _examples([(7, 3), (9, 5), (4, 2), (1, 1)])
    batch = collate_train(examples, 0)
    width = batch.input_ids.shape[1]
    mask = predicting_positions(width, torch.tensor([len(e.response) for e in examples]))
    assert batch.scored.tolist() == mask.reshape(-1).nonzero().squeeze(1).tolist()
    next_tokens = batch.input_ids.reshape(-1)[batch.scored + 1]  # each scored position predicts the token after it
    assert batch.targets.tolist() == next_tokens.tolist() == [t for e in examples for t in e.response]
    torch.testing.assert_close(batch.position_ids, position_ids(batch.attention_mask), atol=0, rtol=0)
    with pytest.raises(ValueError, match="no prompt tokens"):  # its first response token would be predicted from another row
        collate_train([EncodedExample([], [5, 6])] + examples, 0)


def test_batch_moves_to_the_device_in_one_copy():
    batch = collate_train(_examples([(7, 3), (9, 5), (4, 2)]), 0)
    moved = batch.to(DEVICE)
    fields = ("input_ids", "attention_mask", "position_ids", "prompt_lengths", "scored", "targets")
    for name in fields:
        before, after = getattr(batch, name), getattr(moved, name)
        assert after.device.type == DEVICE and after.dtype == before.dtype and torch.equal(after.cpu(), before), name
    assert len({getattr(moved, name).untyped_storage().data_ptr() for name in fields}) == 1  # one buffer, one copy
    assert moved.n_tokens == batch.n_tokens and moved.examples is batch.examples


# ops whose result the host reads (a CUDA host then waits for the device's queue to drain); boolean
# indexing reads the count of true entries
READ_BACK_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default", "aten.is_nonzero.default",
                 "aten.equal.default", "aten._unique2.default", "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor"}


class ReadBacks(TorchDispatchMode):
    """Counts the ops dispatched inside that make the host read a value back from the device."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = str(func).startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for a in args if isinstance(a, (list, tuple)) for i in a)
        if str(func) in READ_BACK_OPS or bool_index:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_training_step_adds_no_read_back_to_the_base_models(tiny, impl):
    """reft_lab's loss, edits and backward never make the host wait for the device: a step reads
    back only what the plain base model's forward reads (transformers' own mask checks)."""
    tuned = attach(tiny(device=DEVICE).model, {"name": "loreft", "layers": [1, 3], "positions": "f2+l2", "impl": impl}).train()
    batch = collate_train(_examples([(7, 3), (9, 5), (4, 2)]), 0).to(DEVICE)
    response_loss(tuned, batch).backward()  # warm: lazy initialisation reads nothing back later
    with ReadBacks() as step:
        response_loss(tuned, batch).backward()
    with ReadBacks() as base, torch.no_grad():
        tuned.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False)
    assert step.ops == base.ops
