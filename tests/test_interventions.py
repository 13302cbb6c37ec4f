"""Each equation against hand-computed values; R stays orthonormal under the trainer's optimizer."""

import pytest
import torch

from reft_lab.interventions import INTERVENTIONS, orthonormal_rows
from reft_lab.methods import attach
from reft_lab.training import build_optimizer
from conftest import DEVICE


def _set(module, **tensors):
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(module, name).copy_(torch.tensor(value, dtype=torch.float32))


def test_loreft_equation_by_hand():
    # R = [1, 0], W = [2, 1], b = 0.5, h = [1, 3]: Wh + b = 5.5, Rh = 1, Rᵀ(4.5) = [4.5, 0]
    m = INTERVENTIONS["loreft"](2, 1, dtype=torch.float32)
    _set(m, rotation=[[1.0, 0.0]], W=[[2.0, 1.0]], b=[0.5])
    out = m(torch.tensor([[1.0, 3.0]]))
    torch.testing.assert_close(out, torch.tensor([[5.5, 3.0]]))


def test_loreft_uses_orthonormalised_rotation():
    # rotation = [3, 4] is orthonormalised to R = [0.6, 0.8]; W = 0, b = 1, h = [1, 1]:
    # Wh + b − Rh = 1 − 1.4 = −0.4; Δ = −0.4·[0.6, 0.8] = [−0.24, −0.32]
    m = INTERVENTIONS["loreft"](2, 1, dtype=torch.float32)
    _set(m, rotation=[[3.0, 4.0]], W=[[0.0, 0.0]], b=[1.0])
    torch.testing.assert_close(m(torch.tensor([[1.0, 1.0]])), torch.tensor([[0.76, 0.68]]))


def test_direft_equation_by_hand():
    # W1 = [1, 1], b = 1, W2 = [0, 2], h = [1, 2]: W1h + b = 4, W2ᵀ·4 = [0, 8]
    m = INTERVENTIONS["direft"](2, 1, dtype=torch.float32)
    _set(m, W1=[[1.0, 1.0]], b=[1.0], W2=[[0.0, 2.0]])
    torch.testing.assert_close(m(torch.tensor([[1.0, 2.0]])), torch.tensor([[1.0, 10.0]]))


def test_noreft_equation_by_hand():
    # R = [1, 1] (unconstrained), W = [3, 0], b = 1, h = [1, 2]: Wh + b − Rh = 4 − 3 = 1, Δ = [1, 1]
    m = INTERVENTIONS["noreft"](2, 1, dtype=torch.float32)
    _set(m, R=[[1.0, 1.0]], W=[[3.0, 0.0]], b=[1.0])
    torch.testing.assert_close(m(torch.tensor([[1.0, 2.0]])), torch.tensor([[2.0, 3.0]]))


def test_orthonormal_rows_is_identity_on_orthonormal_input():
    q = torch.linalg.qr(torch.randn(16, 4))[0].T
    torch.testing.assert_close(orthonormal_rows(q), q, atol=1e-6, rtol=0)
    torch.testing.assert_close(orthonormal_rows(5 * q), q, atol=1e-6, rtol=0)


def _householder_rows(raw):
    """The reference map: Householder QR of rawᵀ, each column's sign fixed by diag(T) > 0."""
    q, t = torch.linalg.qr(raw.double().transpose(-1, -2))
    return (q * torch.sign(torch.diagonal(t, dim1=-2, dim2=-1)).unsqueeze(-2)).transpose(-1, -2)


@pytest.mark.parametrize("shape", [(4, 64), (3, 2, 16), (1, 8)])
def test_orthonormal_rows_is_the_sign_fixed_qr_map_with_its_gradient(shape):
    raw = torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weights = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    ours = orthonormal_rows(raw)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), raw)
    theirs = _householder_rows(raw)
    (grad_theirs,) = torch.autograd.grad((theirs * weights).sum(), raw)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthonormal_rows_holds_at_condition_number_1e4(dtype):
    torch.manual_seed(0)
    u = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(256, 6, dtype=torch.float64))[0]
    raw = (u @ torch.diag(torch.logspace(0, -4, 6, dtype=torch.float64)) @ v.T).to(dtype).to(DEVICE)
    R = orthonormal_rows(raw)
    assert R.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # the cast back to the parameter's dtype
    torch.testing.assert_close(R.double() @ R.double().T, torch.eye(6, dtype=torch.float64, device=DEVICE), atol=tol, rtol=0)


def test_loreft_stacked_factors_equal_each_interventions_own():
    make = INTERVENTIONS["loreft"]
    interventions = [make(32, 4, dtype=torch.float32).to(DEVICE) for _ in range(5)]
    with torch.no_grad():
        for i in interventions:
            i.rotation.mul_(1 + torch.rand(4, 1, device=DEVICE))  # not orthonormal any more
    for stacked, own in zip(type(interventions[0]).stacked_factors(interventions), (i.factors() for i in interventions)):
        for a, b in zip(stacked, own):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.floor  # attaches to a transformers model
def test_factors_are_computed_once_per_forward_for_every_layer(tiny, monkeypatch):
    loreft = INTERVENTIONS["loreft"]
    calls = []
    original = loreft.stacked_factors.__func__
    monkeypatch.setattr(loreft, "stacked_factors", classmethod(lambda cls, items: calls.append(len(items)) or original(cls, items)))
    tuned = attach(tiny("llama", device=DEVICE).model, {"name": "loreft", "rank": 2, "layers": [0, 1, 2], "positions": "f2+l2"})
    ids, lengths = torch.randint(3, 250, (2, 8), device=DEVICE), torch.tensor([5, 6], device=DEVICE)
    tuned(ids, labels=ids, prompt_lengths=lengths).loss.backward()
    with torch.no_grad():
        tuned(ids, prompt_lengths=lengths)
    assert calls == [6, 6], "one batched call per forward, over all 3 layers × 2 position groups"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in tuned.interventions.named_parameters() if "rotation" in n)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_rotation_stays_orthonormal_and_learns_under_trainer_optimizer(tiny, weight_decay):
    loaded = tiny("llama")
    tuned = attach(loaded.model, {"name": "loreft", "rank": 4, "layers": [1, 2], "positions": "f2+l2"})
    intervention = tuned.interventions["layer1_first"]
    before = intervention.R.detach().clone()
    opt = build_optimizer(tuned, lr=1e-2, weight_decay=weight_decay)
    ids = torch.randint(3, 250, (4, 10))
    for _ in range(5):
        out = tuned(ids, labels=ids, prompt_lengths=torch.tensor([6, 6, 5, 4]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    R = intervention.R.detach()
    torch.testing.assert_close(R @ R.T, torch.eye(4), atol=1e-5, rtol=0)
    assert (R - before).abs().max() > 1e-3, "R did not move: the edit would be stuck at its init"


def test_dropout_acts_on_the_edit_only():
    torch.manual_seed(0)
    m = INTERVENTIONS["loreft"](8, 2, dropout=0.5, dtype=torch.float32).train()
    h = torch.randn(64, 8)
    delta = m.delta(h)
    out = m(h)
    kept = torch.isclose(out, h + 2 * delta, atol=1e-6)
    dropped = torch.isclose(out, h, atol=1e-6)
    assert bool((kept | dropped).all()) and kept.any() and dropped.any()
    m.eval()
    torch.testing.assert_close(m(h), h + delta)


@pytest.mark.floor  # attaches to a transformers model
def test_interventions_train_in_fp32_on_a_bf16_base_unless_set(tiny):
    fp32 = attach(tiny("llama", "bfloat16").model, {"name": "loreft", "layers": [0]})
    assert {p.dtype for p in fp32.interventions.parameters()} == {torch.float32}
    bf16 = attach(tiny("llama", "bfloat16").model, {"name": "loreft", "layers": [0], "dtype": "bfloat16"})
    assert {p.dtype for p in bf16.interventions.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 250, (2, 6))
    out = fp32(ids, labels=ids, prompt_lengths=torch.tensor([4, 5]))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fp32.interventions.parameters())
