"""The fused low-rank edit kernel against its eager reference: output and every gradient.

On a CPU-only machine these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1):
tiny shapes. Tests marked gpu run the compiled kernel on CUDA.
"""

import pytest
import torch
from conftest import DEVICE

from reft_lab.interventions.edit import edit_rows, low_rank_edit
from reft_lab.kernels import MAX_RANK, FusedLowRankEdit, fused_low_rank_edit
from reft_lab.kernels.low_rank_edit import hidden_gradient_parts

TOLERANCES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 2e-2), (torch.float16, 5e-3, 5e-3)]
# (batch, T, d, rank, index rows, valid rows): one row; both sequence edges with a padded slot;
# d = 576 (SmolLM2) and d = 50 (not a power of two); rank 1 to 32
SHAPES = [
    (1, 1, 48, 1, [[0]], [[True]]),
    (3, 9, 576, 4, [[0, 8, 4], [1, 2, 0], [8, 0, 3]], [[True, True, True], [True, True, False], [True, True, False]]),
    (2, 5, 50, 32, [[0, 4], [3, 1]], [[True, True], [False, True]]),
    (2, 6, 64, 7, [[5, 0, 2], [4, 3, 0]], [[True, True, True], [True, True, True]]),
]


def _inputs(shape, dtype, seed=0):
    batch, T, d, r, index, valid = shape
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, T, d, generator=g).to(DEVICE, dtype)
    A = (torch.randn(r, d, generator=g) / d ** 0.5).to(DEVICE, dtype)
    B = (torch.randn(r, d, generator=g) / d ** 0.5).to(DEVICE, dtype)
    b = torch.randn(r, generator=g).to(DEVICE, dtype)
    return [t.requires_grad_() for t in (h, A, B, b)], torch.tensor(index, device=DEVICE), torch.tensor(valid, device=DEVICE)


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["one-row", "d576-edges-padded", "d50-rank32", "rank7"])
def test_forward_and_every_gradient_match_reference(dtype, atol, rtol, shape):
    (h, A, B, b), index, valid = _inputs(shape, dtype)
    out = fused_low_rank_edit(h, index, valid, A, B, b)
    ref = low_rank_edit(h, index, valid, A, B, b)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (h, A, B, b), grad)
    want = torch.autograd.grad(ref, (h, A, B, b), grad)
    for name, x, y in zip(("h", "A", "B", "b"), got, want):
        scale = max(1.0, float(y.abs().max()))  # sums over rows: compare relative to their size
        torch.testing.assert_close(x, y, atol=atol * scale, rtol=rtol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_saves_the_edited_rows_in_their_own_dtype(dtype):
    """Saved rows are the input rows exactly: in bf16 they take half the bytes of an fp32 copy."""
    (h, A, B, b), index, valid = _inputs(SHAPES[1], dtype)
    out = fused_low_rank_edit(h.detach().clone(), index, valid, A, B, b)
    rows = [t for t in out.grad_fn.saved_tensors if t.shape == (index.numel(), h.shape[-1])]
    assert len(rows) == 1 and rows[0].dtype == dtype
    selected = h.detach().reshape(-1, h.shape[-1])[(torch.arange(3, device=DEVICE)[:, None] * h.shape[1] + index).reshape(-1)]
    assert torch.equal(rows[0][valid.reshape(-1)], selected[valid.reshape(-1)])


def test_bf16_rows_with_fp32_factors_match_reference():
    """A bf16 base with fp32 interventions (the default on a bf16 base): output and every gradient."""
    (h, A, B, b), index, valid = _inputs(SHAPES[1], torch.bfloat16)
    A, B, b = (t.detach().float().requires_grad_() for t in (A, B, b))
    out = fused_low_rank_edit(h, index, valid, A, B, b)
    ref = low_rank_edit(h, index, valid, A, B, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=2e-2)
    grad = torch.randn_like(out)
    for name, x, y in zip("hABb", torch.autograd.grad(out, (h, A, B, b), grad), torch.autograd.grad(ref, (h, A, B, b), grad)):
        assert x.dtype == y.dtype, name
        torch.testing.assert_close(x.float(), y.float(), atol=3e-2 * max(1.0, float(y.abs().max())), rtol=2e-2, msg=lambda m: f"d{name}: {m}")


def test_padding_and_unselected_rows_pass_through():
    (h, A, B, b), index, valid = _inputs(SHAPES[1], torch.float32)
    out = fused_low_rank_edit(h, index, valid, A, B, b)
    changed = (out - h).abs().amax(-1) > 0
    selected = torch.zeros_like(changed)
    for row in range(index.shape[0]):
        selected[row, index[row][valid[row]]] = True
    assert torch.equal(changed, selected)


def test_non_contiguous_hidden():
    (h, A, B, b), index, valid = _inputs(SHAPES[3], torch.float32)
    wide = torch.cat([h.detach(), h.detach()], -1)[..., : h.shape[-1]]  # a strided view
    assert not wide.is_contiguous()
    torch.testing.assert_close(fused_low_rank_edit(wide, index, valid, A, B, b),
                               low_rank_edit(wide, index, valid, A, B, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda h, A, B, b: (h.double(), A.double(), B.double(), b.double()), "dtype"),
        (lambda h, A, B, b: (h, torch.randn(MAX_RANK + 1, h.shape[-1]), torch.randn(MAX_RANK + 1, h.shape[-1]), torch.randn(MAX_RANK + 1)), "rank 65"),
        (lambda h, A, B, b: (h, A[:, :-1], B[:, :-1], b), "do not fit"),
    ],
    ids=["float64", "rank-above-limit", "mismatched-shapes"],
)
def test_bad_input_is_refused(change, needle):
    (h, A, B, b), index, valid = _inputs(SHAPES[0], torch.float32)
    h, A, B, b = change(h.detach(), A.detach(), B.detach(), b.detach())
    with pytest.raises(ValueError, match=needle):
        fused_low_rank_edit(h, index, valid, A, B, b)
    with pytest.raises(ValueError, match="shapes do not match"):
        fused_low_rank_edit(h, index[:, :0], valid, A, B, b)


def test_module_falls_back_to_reference_above_the_rank_limit():
    (h, _, _, _), index, valid = _inputs(SHAPES[0], torch.float32)
    A, B, b = (torch.randn(MAX_RANK + 1, 48, device=DEVICE), torch.randn(MAX_RANK + 1, 48, device=DEVICE),
               torch.randn(MAX_RANK + 1, device=DEVICE))
    torch.testing.assert_close(FusedLowRankEdit()(h, index, valid, A, B, b), low_rank_edit(h, index, valid, A, B, b))


def _stacked(shape, dtype, k, seed=0):
    """K adapters' factors stacked: A, B [K, r, d], b [K, r]."""
    factors = [_inputs(shape, dtype, seed + i)[0][1:] for i in range(k)]
    return [torch.stack([f[j].detach() for f in factors]) for j in range(3)]


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=["d576-edges-padded", "d50-rank32", "rank7"])
def test_per_row_adapters_match_reference_and_single_adapters(dtype, atol, rtol, shape):
    (h, _, _, _), index, valid = _inputs(shape, dtype)
    h = h.detach()
    A, B, b = _stacked(shape, dtype, k=3)
    adapter = torch.tensor([2, 0, 1][: h.shape[0]], device=DEVICE)
    with torch.no_grad():
        out = fused_low_rank_edit(h.clone(), index, valid, A, B, b, adapter)
        torch.testing.assert_close(out, low_rank_edit(h, index, valid, A, B, b, adapter), atol=atol, rtol=rtol)
        for row, k in enumerate(adapter.tolist()):  # each row as if its adapter were served alone
            alone = fused_low_rank_edit(h[row: row + 1].clone(), index[row: row + 1], valid[row: row + 1], A[k], B[k], b[k])
            torch.testing.assert_close(out[row: row + 1], alone, atol=atol, rtol=rtol)


def test_per_row_adapters_refuse_bad_ids_and_gradients():
    (h, _, _, _), index, valid = _inputs(SHAPES[3], torch.float32)
    A, B, b = _stacked(SHAPES[3], torch.float32, k=2)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fused_low_rank_edit(h.detach(), index, valid, A, B, b, torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="one per batch row"):
            fused_low_rank_edit(h.detach(), index, valid, A, B, b, torch.tensor([0]))
        with pytest.raises(ValueError, match=r"A, B \[K, r, d\]"):
            fused_low_rank_edit(h.detach(), index, valid, A[0], B[0], b[0], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="inference-only"):
        fused_low_rank_edit(h, index, valid, A, B, b, torch.tensor([0, 1]))


def _training_losses(overrides: list[str]) -> list[float]:
    """The logged loss of every step of a smoke training job on the tiny model, on DEVICE."""
    from reft_lab.config import compose
    from reft_lab.data.batching import PromptEncoder, encode_examples
    from reft_lab.methods import attach
    from reft_lab.models import load_model
    from reft_lab.settings import RunSettings
    from reft_lab.tasks import load_task
    from reft_lab.training import seed_everything, train

    settings = RunSettings.from_cfg(compose(["model=tiny", f"model.device={DEVICE}", "trainer=smoke", "method.layers=[1,3]",
                                             "method.rank=2", "task.train_size=12", *overrides]))
    seed_everything(0)
    loaded = load_model(settings.model)
    tuned = attach(loaded.model, settings.method)
    encoder = PromptEncoder(loaded.tokenizer)

    class Record:
        values = []

        def log(self, step, v):
            self.values.append(v["loss"])

    record = Record()
    train(tuned, encode_examples(encoder, load_task(settings.task).train), settings.trainer, lr=settings.lr,
          seed=settings.seed, pad_id=encoder.pad_id, logger=record)
    return record.values


@pytest.mark.parametrize("name", ["loreft", "direft", "noreft"])
def test_model_trains_to_the_same_losses_with_triton_and_eager(name):
    losses = {impl: _training_losses([f"method={name}", f"method.impl={impl}", "model.dtype=float32"]) for impl in ("eager", "triton")}
    assert losses["triton"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-6)


def test_bf16_base_trains_to_close_losses_with_triton_and_eager():
    """The GPU setting the README advises: a bf16 frozen base (its RMSNorms then save their bf16
    input), fp32 interventions, the kernel editing bf16 rows in place. The edited rows' bf16
    rounding may differ by an ulp between the two (4e-5 of the loss in the interpreter), hence a
    tolerance."""
    losses = {impl: _training_losses(["method=loreft", f"method.impl={impl}", "model.dtype=bfloat16"]) for impl in ("eager", "triton")}
    assert len(losses["eager"]) > 1
    assert losses["triton"] == pytest.approx(losses["eager"], rel=5e-3)


def test_served_adapters_give_the_same_logits_with_triton_and_eager(tiny, batch, tmp_path):
    from reft_lab.adapters import load_adapter_bank, save_adapter
    from reft_lab.methods import attach

    dirs = []
    for k, name in enumerate(["loreft", "direft"]):
        torch.manual_seed(k)
        dirs.append(save_adapter(attach(tiny(device=DEVICE).model, {"name": name, "layers": [1, 3], "rank": 2}), tmp_path / name))
    ids, mask, lengths = (t.to(DEVICE) for t in batch)
    logits = {}
    for impl in ("eager", "triton"):
        served = load_adapter_bank(tiny(device=DEVICE).model, dirs)
        served.config.impl = impl
        with torch.no_grad():
            logits[impl] = served(ids, attention_mask=mask, prompt_lengths=lengths,
                                  adapter_ids=torch.tensor([1, 0], device=DEVICE)).logits
    torch.testing.assert_close(logits["triton"], logits["eager"], atol=1e-5, rtol=1e-5)


def test_fused_path_flattens_positions_once_per_group_per_batch(tiny, batch, monkeypatch):
    """Every edited layer of a batch reuses the kernel's row ids of its position group; a beam search
    (each prompt's rows repeated) gets its own, and its first-step scores (the edited prompt pass, every
    beam) match the eager edit's."""
    import reft_lab.kernels as kernels
    from reft_lab.methods import attach

    calls = []
    real = kernels.flat_rows
    monkeypatch.setattr(kernels, "flat_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    ids, mask, lengths = (t.to(DEVICE) for t in batch)
    out = {}
    for impl in ("eager", "triton"):
        torch.manual_seed(0)
        tuned = attach(tiny(device=DEVICE).model, {"name": "loreft", "layers": [0, 1, 2, 3], "positions": "f2+l2", "impl": impl}).eval()
        calls.clear()
        with torch.no_grad():
            tuned(ids, attention_mask=mask, prompt_lengths=lengths)
        assert len(calls) == (2 if impl == "triton" else 0)  # two groups (first, last), four layers
        calls.clear()
        out[impl] = tuned.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, num_return_sequences=2,
                                   do_sample=False, output_scores=True, return_dict_in_generate=True).scores[0]
        assert calls == ([(4, 2), (4, 2)] if impl == "triton" else [])  # 2 prompts × 2 beams, per group
    torch.testing.assert_close(out["triton"], out["eager"], atol=1e-5, rtol=1e-5)


def test_eager_path_builds_row_coords_once_per_batch(tiny, batch, monkeypatch):
    """The eager edit's backward addresses its rows by (batch, position): every edited layer and
    group of a batch shares one ``row_coords`` of the batch's positions, forward and backward;
    the next batch builds its own."""
    import reft_lab.positions as positions
    from reft_lab.methods import attach

    calls = []
    real = positions.row_coords
    monkeypatch.setattr(positions, "row_coords", lambda index: calls.append(index.shape) or real(index))
    ids, mask, lengths = (t.to(DEVICE) for t in batch)
    tuned = attach(tiny(device=DEVICE).model, {"name": "loreft", "layers": [0, 1, 2, 3], "positions": "f2+l2", "impl": "eager"}).train()
    for _ in range(2):
        tuned(ids, attention_mask=mask, prompt_lengths=lengths).logits.float().square().mean().backward()
    assert calls == [(2, 4), (2, 4)]  # 2 prompts × 4 positions, once per batch for 4 layers × 2 groups
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tuned.trainable_state().values())


def test_eager_edit_builds_row_coords_only_for_a_gradient(monkeypatch):
    """Without coords from its caller, the eager edit builds them in backward: none at inference."""
    import reft_lab.interventions.edit as edit

    calls = []
    real = edit.row_coords
    monkeypatch.setattr(edit, "row_coords", lambda index: calls.append(index.shape) or real(index))
    (x, A, B, b), index, valid = _inputs(SHAPES[1], torch.float32)
    with torch.no_grad():
        low_rank_edit(x, index, valid, A, B, b)
    assert calls == []
    low_rank_edit(x, index, valid, A, B, b).sum().backward()
    assert calls == [index.shape]


def test_preflight_checks_impl_triton_against_the_device_the_model_loads_on(monkeypatch):
    """The preflight attaches to a meta-device copy: the kernel check asks of the load device, so
    impl=triton passes for a CUDA model (CUDA faked, interpreter off) and fails, before any load,
    for a CPU one."""
    from reft_lab.config import compose
    from reft_lab.errors import ConfigError
    from reft_lab.settings import RunSettings

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device in ("cuda", "auto"):
        RunSettings.from_cfg(compose(["model=tiny", f"model.device={device}", "method=loreft", "method.impl=triton"])).preflight()
    with pytest.raises(ConfigError, match="method.impl.*needs CUDA"):
        RunSettings.from_cfg(compose(["model=tiny", "model.device=cpu", "method=loreft", "method.impl=triton"])).preflight()


def test_impl_triton_errors_where_the_kernel_cannot_run(tiny, monkeypatch):
    from reft_lab.errors import ConfigError
    from reft_lab.methods import attach

    with pytest.raises(ConfigError, match="method.impl"):
        attach(tiny().model, {"name": "loreft", "impl": "triton", "dropout": 0.1})
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ConfigError, match="needs CUDA"):
            attach(tiny().model, {"name": "loreft", "impl": "triton"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=["fp32", "bf16", "fp16"])
def test_gpu_large_shape(dtype, atol, rtol):
    shape = (8, 512, 4096, 16, torch.randint(0, 512, (8, 32)).tolist(), [[True] * 32] * 8)
    (h, A, B, b), index, valid = _inputs(shape, dtype)
    index = torch.stack([torch.randperm(512, device=DEVICE)[:32] for _ in range(8)])
    out = fused_low_rank_edit(h, index, valid, A, B, b)
    torch.testing.assert_close(out, low_rank_edit(h, index, valid, A, B, b), atol=atol, rtol=rtol)


def test_in_place_on_a_layer_output_keeps_gradients_exact():
    """Inside a model the hidden state is a non-leaf: it is edited in place (selected rows only)."""
    (x, A, B, b), index, valid = _inputs(SHAPES[3], torch.float32)
    hidden = x * 1.0
    out = fused_low_rank_edit(hidden, index, valid, A, B, b)
    assert out.data_ptr() == hidden.data_ptr()
    ref = low_rank_edit(x * 1.0, index, valid, A, B, b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (x, A, B, b), grad), torch.autograd.grad(ref, (x, A, B, b), grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class _GradientProbe(torch.autograd.Function):
    """Identity that records the gradient reaching it."""

    seen: list[torch.Tensor] = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _GradientProbe.seen.append(grad)
        return grad


class _DoubleSelectedRows(torch.autograd.Function):
    """h[rows] *= 2 in place, its input gradient in the two parts the kernel's backward returns."""

    @staticmethod
    def forward(ctx, hidden, _hidden_again, coords):
        hidden[coords[0], coords[1]] *= 2
        ctx.mark_dirty(hidden)
        ctx.save_for_backward(coords)
        return hidden

    @staticmethod
    def backward(ctx, grad_out):
        (coords,) = ctx.saved_tensors
        return *hidden_gradient_parts(grad_out, coords, grad_out[coords[0], coords[1]]), None


def _gradient_below(edit, shared: bool, dtype=torch.float32):
    """A hidden state edited by ``edit(hidden, index, valid, A, B, b)``, then read as a layer reads
    it: by a product and, when ``shared``, by an addition with another tensor that needs a gradient
    (the addition hands both operands one gradient tensor). Returns the gradient that reaches the
    hidden state below the edit, where in memory the gradient above it was (a reference kept here
    would itself stop autograd from summing in place), the other operand's gradient (None when not
    ``shared``) and the exact dL/dy."""
    (x, A, B, b), index, valid = _inputs(SHAPES[1], dtype)
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype).requires_grad_()
    above = []
    _GradientProbe.seen.clear()
    out = edit(_GradientProbe.apply(x), index, valid, A, B, b)
    out.register_hook(lambda grad: above.append(grad.data_ptr()))
    y = out + other if shared else out * 3.0
    _, go = torch.autograd.grad((y * y).sum(), (x, other), allow_unused=True)
    return _GradientProbe.seen[0], above[0], go, 2 * y.detach()


def test_autograd_sums_the_two_gradient_parts_in_place_unless_the_gradient_is_shared():
    """The rule the kernel's backward relies on, with a plain-torch edit: the gradient below the edit
    is the incoming one, rows added in place, when nothing else holds it; when an addition shares
    it with another operand, that operand's gradient is left exactly dL/dy."""
    (x, *_), index, valid = _inputs(SHAPES[1], torch.float32)
    coords = torch.stack(torch.where(valid))
    coords[1] = index[valid]

    def double_rows(hidden, index, valid, A, B, b):
        return _DoubleSelectedRows.apply(hidden, hidden, coords)

    def double_rows_eager(hidden, index, valid, A, B, b):
        return edit_rows(hidden, index, valid, lambda rows: rows)

    below, above, _, _ = _gradient_below(double_rows, shared=False)
    assert below.data_ptr() == above
    want, _, _, _ = _gradient_below(double_rows_eager, shared=False)
    torch.testing.assert_close(below, want, atol=0, rtol=0)
    below, above, other, dy = _gradient_below(double_rows, shared=True)
    assert below.data_ptr() != above
    torch.testing.assert_close(other, dy, atol=0, rtol=0)
    torch.testing.assert_close(below, _gradient_below(double_rows_eager, shared=True)[0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES[:2], ids=["fp32", "bf16"])
def test_kernel_backward_leaves_a_shared_gradient_unchanged(dtype, atol, rtol):
    """When the incoming gradient is also another operand's (a residual addition), the edited rows
    are not written into it; the gradient below the edit is still the eager edit's."""
    below, _, other, dy = _gradient_below(fused_low_rank_edit, shared=True, dtype=dtype)
    torch.testing.assert_close(other, dy, atol=0, rtol=0)
    want = _gradient_below(low_rank_edit, shared=True, dtype=dtype)[0]
    torch.testing.assert_close(below, want, atol=atol * max(1.0, float(want.abs().max())), rtol=rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton's interpreter holds its arguments' storages)")
def test_kernel_backward_copies_no_whole_gradient_on_cuda():
    below, above, _, _ = _gradient_below(fused_low_rank_edit, shared=False)
    assert below.data_ptr() == above
    torch.testing.assert_close(below, _gradient_below(low_rank_edit, shared=False)[0], atol=1e-5, rtol=1e-5)


def _eager_edit(in_place: bool):
    def edit(hidden, index, valid, A, B, b):
        return edit_rows(hidden, index, valid, lambda rows: torch.tanh(rows @ A.T + b) @ B, in_place=in_place)

    return edit


def test_eager_edit_of_a_layer_output_is_in_place_and_equals_the_out_of_place_edit():
    """The CPU path's edit of a layer output (``in_place=True``) edits the hidden state itself; its
    output and the gradient below it equal the out-of-place edit's bit for bit, and a gradient
    shared with another operand is left dL/dy."""
    (x, A, B, b), index, valid = _inputs(SHAPES[1], torch.float32)
    hidden = x * 1.0
    out = _eager_edit(in_place=True)(hidden, index, valid, A, B, b)
    assert out.data_ptr() == hidden.data_ptr()
    torch.testing.assert_close(out, _eager_edit(in_place=False)(x * 1.0, index, valid, A, B, b), atol=0, rtol=0)
    for shared in (False, True):
        below, _, other, dy = _gradient_below(_eager_edit(in_place=True), shared=shared)
        torch.testing.assert_close(below, _gradient_below(_eager_edit(in_place=False), shared=shared)[0], atol=0, rtol=0)
        if shared:
            torch.testing.assert_close(other, dy, atol=0, rtol=0)


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "out-of-place"])
def test_eager_edit_keeps_no_tensor_the_size_of_the_hidden_state_for_backward(in_place):
    """torch's gather keeps its whole input for backward: the unedited hidden state, a second one
    per edited layer beside the edited one. The edit's gather keeps only the index and the rows'
    (batch, position) coordinates."""
    (x, A, B, b), index, valid = _inputs(SHAPES[1], torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        _eager_edit(in_place)(x * 1.0, index, valid, A, B, b)
    assert saved and max(saved) < x.numel(), saved


def test_factor_gradients_where_the_hidden_state_needs_none():
    """At the lowest edited layer of a frozen model the hidden state needs no gradient, and the
    backward forms none: the factors still get theirs, exactly as the eager edit's."""
    (h, A, B, b), index, valid = _inputs(SHAPES[1], torch.float32)
    h = h.detach()
    got = torch.autograd.grad(fused_low_rank_edit(h.clone(), index, valid, A, B, b).square().sum(), (A, B, b))
    want = torch.autograd.grad(low_rank_edit(h, index, valid, A, B, b).square().sum(), (A, B, b))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_create_graph_gives_the_same_first_gradients():
    """With create_graph=True autograd sums gradients out of place, and the rows' part is dense."""
    (x, A, B, b), index, valid = _inputs(SHAPES[3], torch.float32)
    grads = [torch.autograd.grad(edit(x * 1.0, index, valid, A, B, b).square().sum(), (x, A), create_graph=True)
             for edit in (fused_low_rank_edit, low_rank_edit)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kernel_benchmark_writes_every_row(tmp_path):
    """Every provider, mode and dtype gives a row: pyreft's bf16 rows run its module in fp32 (no
    bf16 QR on CUDA) and its backward differentiates pyreft's own parameters."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "experiments" / "kernels" / "bench_kernels.py"
    out = tmp_path / "rows.csv"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--shapes", "tiny"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    seen = {(r["provider"], r["mode"], r["dtype"]) for r in rows}
    for dtype in ("bfloat16", "float32"):
        for provider in ("triton", "eager", "pyreft"):
            assert {(provider, mode, dtype) for mode in ("fwd", "bwd", "full")} <= seen
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert {r["params_dtype"] for r in rows if r["provider"] == "pyreft"} == {"float32"}


def test_factor_benchmark_writes_both_providers_and_counts_fewer_ops_when_stacked(tmp_path):
    import csv
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "experiments" / "kernels" / "bench_factors.py"
    out = tmp_path / "factors.csv"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--interventions", "6", "--hidden", "32",
                           "--warmup", "1", "--repeats", "2", "--device", DEVICE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["provider"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"per_intervention_householder", "stacked_cholesky"}
    assert int(rows["stacked_cholesky"]["aten_ops"]) < int(rows["per_intervention_householder"]["aten_ops"]) / 3
    assert all(float(r["median_ms"]) > 0 for r in rows.values())


def test_kernels_compiled_for_an_h100_spill_no_registers(tmp_path):
    """The launch configuration keeps every kernel's values in registers at a 7B width and rank 16
    (with Triton's default of 4 warps and an unrolled rank loop, forward and backward spilled 640+
    bytes per thread there). Compiled for sm_90 by Triton's own compiler: no GPU needed."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton.backends.nvidia as nvidia

    if not (Path(nvidia.__file__).parent / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton ships no cuobjdump to read compiled kernels with")
    script = Path(__file__).parents[1] / "experiments" / "kernels" / "kernel_resources.py"
    out = tmp_path / "resources.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), "--widths", "4096", "--ranks", "16", "--dtypes", "bfloat16",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["kernel"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"train_fwd", "train_bwd", "serve_fwd"}
    assert {name: int(r["stack_bytes"]) for name, r in rows.items()} == dict.fromkeys(rows, 0)
