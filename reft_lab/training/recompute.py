"""Gated MLPs that keep act(gate) out of training memory.

A gated MLP (Llama and Qwen2 among the tested shapes) computes ``down(act(gate(x)) * up(x))``. Autograd
saves three [tokens, intermediate] tensors per layer for it: gate (for act's backward), act(gate)
and up (for the product's backward). ``GatedProduct`` saves gate and up only and recomputes
act(gate) in backward, one cheap pointwise op, so a third of the MLP's saved activations go: about
a sixth of a ReFT step's activation memory on SmolLM2 (``reft-lab bench``). Values and gradients are
the same kernels on the same inputs, so they are bit-identical to the plain module's.

No per-architecture table: a module is swapped only when it has ``gate_proj``, ``up_proj``,
``down_proj`` and ``act_fn`` and the swapped forward reproduces its own forward exactly on a probe
input; anything else (GPT-2's MLP, fused ``gate_up_proj``) keeps its forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

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


@contextmanager
def lean_gated_mlps(model: nn.Module):
    """While the context lasts, every gated MLP of ``model`` recomputes act(gate) in backward;
    yields how many were swapped (0 for architectures without one)."""
    mlps = gated_mlps(model)
    with swapped_forwards(mlps, _lean_forward):
        yield len(mlps)
