"""What the frozen base's modules recompute in backward instead of saving: the swaps of
``trainer.recompute_mlp_act`` and ``trainer.recompute_mlp`` (gated MLPs) and
``trainer.recompute_norm_upcast`` (RMSNorms).

One rule for all three: a module is swapped only when a swapped forward reproduces its own exactly on
a probe input (the MLP: the ``GatedProduct`` form; the norm: its input gradient too), so there is no
per-architecture table, and values and gradients are the same kernels on the same inputs:
bit-identical to the plain module's.

A gated MLP (Llama and Qwen2 among the tested shapes) computes ``down(act(gate(x)) * up(x))``. Autograd
saves three [tokens, intermediate] tensors per layer for it: gate (for act's backward), act(gate)
and up (for the product's backward). ``GatedProduct`` saves gate and up only and recomputes
act(gate) in backward, one cheap pointwise op, so a third of the MLP's saved activations go: about
a sixth of a ReFT step's activation memory on SmolLM2 (``reft-lab bench``).

A module is swapped when it has ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` and passes
the probe; anything else (GPT-2's MLP, fused ``gate_up_proj``) keeps its forward.

``trainer.recompute_mlp`` (opt-in) goes further: the MLP saves only its input x and recomputes
gate(x), up(x) and act in backward (a checkpoint of the product), so none of the three [tokens,
intermediate] tensors is kept; it costs the two projections' forward again (a 1.10-1.12× step on a
CPU at SmolLM2's shapes, README). A middle point between the default and
``trainer.gradient_checkpointing``, which recomputes whole layers.

An RMSNorm (Llama, Qwen2, Mistral…) upcasts a bf16/fp16 input to fp32 and autograd saves that fp32
copy: two bytes per value more than the input itself, 16 KiB per token and layer at LLaMA-7B's width
(two norms), of the ~107 KiB per token and layer a LoReFT step held there on the H100 (11,104 MiB
over 26 layers × 4096 tokens). ``FrozenRMSNorm`` saves the input and the per-row 1/rms, and redoes
the upcast in backward (one cast); one autograd node instead of seven. Swapped: norms with a frozen
bf16/fp16 weight (a frozen low-precision base; full fine-tuning keeps its plain norms). An fp32 norm
has no upcast to drop, and is left alone because its gradient would not be bit-identical: autograd
adds the norm's two inner contributions to the residual's gradient in one buffer, where the swapped
norm adds their sum (another rounding order). Behind a cast, as in bf16, both orders are the same.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from reft_lab.models.layers import swapped_forwards


class GatedProduct(torch.autograd.Function):
    """act(gate) * up, saving gate and up; act(gate) is recomputed in backward. ``silu``: act is SiLU,
    whose gradient is the one op autograd itself would run (``silu_backward``); any other act is
    differentiated by a nested autograd call, which costs the host a graph and an engine run per layer."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: nn.Module, silu: bool) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.silu = act, silu
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        if ctx.silu:
            activated = F.silu(gate)
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        else:
            with torch.enable_grad():
                leaf = gate.detach().requires_grad_(ctx.needs_input_grad[0])
                activated = ctx.act(leaf)
            grad_gate = torch.autograd.grad(activated, leaf, grad * up)[0] if ctx.needs_input_grad[0] else None
            activated = activated.detach()
        grad_up = grad * activated if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, None, None


def _probe(module: nn.Module) -> torch.Tensor:
    weight = next(module.parameters())
    return torch.randn(2, 3, module.gate_proj.in_features, generator=torch.Generator().manual_seed(0)).to(weight)


def _lean_forward(mlp: nn.Module):
    with torch.no_grad():
        gate = mlp.gate_proj(_probe(mlp))
        silu = torch.equal(mlp.act_fn(gate), F.silu(gate))

    def forward(x):
        return mlp.down_proj(GatedProduct.apply(mlp.gate_proj(x), mlp.up_proj(x), mlp.act_fn, silu))

    return forward


def _is_gated_mlp(module: nn.Module) -> bool:
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    try:
        probe = _probe(module)
        with torch.no_grad():
            return torch.equal(_lean_forward(module)(probe), module(probe))
    except Exception:  # another layout or signature: not the pattern
        return False


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """The model's gated MLPs whose forward is exactly down(act(gate(x)) * up(x))."""
    return [module for module in model.modules() if _is_gated_mlp(module)]


def _recomputing_forward(mlp: nn.Module):
    def product(x):
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)

    def forward(x):
        if not torch.is_grad_enabled():
            return mlp.down_proj(product(x))
        # the product has no randomness: no RNG state to save and restore per call
        return mlp.down_proj(checkpoint(product, x, use_reentrant=False, preserve_rng_state=False))

    return forward


@contextmanager
def lean_gated_mlps(model: nn.Module, recompute_projections: bool = False):
    """While the context lasts, every gated MLP of ``model`` recomputes act(gate) in backward (with
    ``recompute_projections``: gate, up and act, from its saved input); yields how many were swapped
    (0 for architectures without one)."""
    mlps = gated_mlps(model)
    with swapped_forwards(mlps, _recomputing_forward if recompute_projections else _lean_forward):
        yield len(mlps)


class FrozenRMSNorm(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype), computed in fp32 like transformers' RMSNorm;
    saves x in its own dtype and the per-row rsqrt. The backward is autograd's own chain of ops for
    that forward (mul, cast, mul, sum, rsqrt', mean', pow'), so the input gradient is bit-identical."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        upcast = x.to(torch.float32)
        inv_rms = torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, inv_rms, weight)
        return weight * (upcast * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, inv_rms, weight = ctx.saved_tensors
        upcast = x.to(torch.float32)
        grad_normed = (grad * weight).to(torch.float32)
        grad_inv_rms = (grad_normed * upcast).sum(-1, keepdim=True)
        grad_mean = (grad_inv_rms * -0.5 * inv_rms.pow(3)).expand(upcast.shape) / upcast.shape[-1]
        grad_upcast = grad_normed * inv_rms + grad_mean * (2.0 * upcast.pow(1.0))
        return grad_upcast.to(x.dtype), None, None


def _norm_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return eps if isinstance(eps, float) else None


def _lean_norm_forward(norm: nn.Module):
    weight, eps, plain = norm.weight, _norm_eps(norm), norm.forward

    def forward(x):  # the dtype the probe checked; another (an fp32 input to a bf16 norm) runs the plain forward
        return FrozenRMSNorm.apply(x, weight, eps) if x.dtype == weight.dtype else plain(x)

    return forward


def _is_frozen_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if not (isinstance(weight, nn.Parameter) and weight.dim() == 1 and not weight.requires_grad
            and weight.dtype in (torch.bfloat16, torch.float16) and _norm_eps(module) is not None):
        return False
    g = torch.Generator().manual_seed(0)
    probe = (3 * torch.randn(2, 3, weight.numel(), generator=g)).to(weight)
    probe_grad = torch.randn(2, 3, weight.numel(), generator=g).to(weight)
    try:
        with torch.enable_grad():
            outputs = []
            for forward in (module.forward, _lean_norm_forward(module)):
                x = probe.clone().requires_grad_()
                y = forward(x)
                outputs.append((y.detach(), torch.autograd.grad(y, x, probe_grad)[0]))
    except Exception:  # another signature or layout: not the pattern
        return False
    (y_plain, dx_plain), (y_lean, dx_lean) = outputs
    return torch.equal(y_plain, y_lean) and torch.equal(dx_plain, dx_lean)


def frozen_rms_norms(model: nn.Module) -> list[nn.Module]:
    """The model's RMSNorms with a frozen bf16/fp16 weight whose forward and input gradient
    ``FrozenRMSNorm`` reproduces exactly."""
    return [module for module in model.modules() if _is_frozen_rms_norm(module)]


@contextmanager
def lean_rms_norms(model: nn.Module):
    """While the context lasts, every frozen RMSNorm of ``model`` saves its input instead of its fp32
    upcast; yields how many were swapped."""
    norms = frozen_rms_norms(model)
    with swapped_forwards(norms, _lean_norm_forward):
        yield len(norms)
