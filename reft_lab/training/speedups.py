"""The training-time speed-ups that swap the model's forwards, undone when training ends.

* ``trainer.compile``: each decoder block's forward through ``torch.compile`` (regional); with
  ``trainer.cuda_graphs``, replayed as CUDA graphs.
* ``trainer.recompute_mlp_act``: gated MLPs recompute act(gate) in backward (``recompute``);
  ``trainer.recompute_mlp``: gate, up and act, from the MLP's input.
* ``trainer.recompute_norm_upcast``: frozen RMSNorms save their input, not its fp32 upcast (``recompute``).
* ``trainer.prefix_cache``: ReFT reuses the frozen activations below its lowest layer (``prefix_cache``).
Each leaves the numbers as they were (the prefix cache to float rounding; see its module).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from reft_lab.accounting import fingerprint
from reft_lab.methods import ReftModel, TunedModel
from reft_lab.models.layers import decoder_layers, swapped_forwards
from reft_lab.models.loading import DTYPES
from reft_lab.training.config import TrainerConfig
from reft_lab.training.prefix_cache import PrefixCache, stochastic_prefix
from reft_lab.training.recompute import lean_gated_mlps, lean_rms_norms


def _mark_batch_and_length_dynamic(module, args, kwargs) -> None:
    """Forward pre-hook: the batch and sequence dims of a block's inputs may vary, so the first
    compile is shape-generic and later lengths reuse it. Without the hint, dynamo compiles the first
    length statically and recompiles at the second (about 20 s per graph for SmolLM2 on 2 CPU cores).
    Float [B, T, hidden] tensors (hidden states, rotary tables) keep their last dim static; masks,
    position ids and cache positions hint every dim."""
    def mark(t) -> None:
        if isinstance(t, (tuple, list)):
            for item in t:
                mark(item)
        elif isinstance(t, torch.Tensor):
            dims = (0, 1) if t.is_floating_point() and t.dim() == 3 else range(t.dim())
            for d in dims:
                if t.shape[d] > 1:  # size-1 dims specialise anyway
                    torch._dynamo.maybe_mark_dynamic(t, d)

    mark(args)
    mark(list(kwargs.values()))


@contextmanager
def compiled_layers(model: nn.Module, cuda_graphs: bool = False):
    """Each decoder block's forward through ``torch.compile`` while the context lasts.

    Regional compilation: the blocks share one class, so one graph serves them all and a cold compile
    takes seconds, not the minutes of a whole-model compile. Batch and sequence dims are hinted
    dynamic, so a run compiles two graphs (blocks below the lowest intervened layer get no gradient)
    and new batch shapes reuse them. Hooks (the ReFT edits) stay eager around the compiled forward.
    Inductor fuses the pointwise ops and, for backward, recomputes cheap ones instead of saving them
    (less activation memory). Restored on exit, so generation afterwards runs the plain layers (its
    growing KV cache would only trigger recompiles).

    ``cuda_graphs``: inductor's ``reduce-overhead`` mode captures each compiled block's forward and
    backward as CUDA graphs, one per batch shape, and replays them: one launch per block instead of
    one per kernel, for steps bound by the host's launches (a small model). The edits between blocks
    stay eager. The caller marks each step's start (``torch.compiler.cudagraph_mark_step_begin``)
    and pads lengths to a multiple (``TrainerConfig.length_multiple``) so few shapes are captured.
    """
    blocks = decoder_layers(model)
    handles = [block.register_forward_pre_hook(_mark_batch_and_length_dynamic, with_kwargs=True) for block in blocks]
    mode = "reduce-overhead" if cuda_graphs else None
    try:
        with swapped_forwards(blocks, lambda block: torch.compile(block.forward, mode=mode)):
            yield
    finally:
        for handle in handles:
            handle.remove()


def hot_path(tuned: TunedModel, t: TrainerConfig) -> ExitStack:
    """The training-time swaps of the model's forwards, undone on exit: compiled decoder blocks
    (``trainer.compile``, captured as CUDA graphs with ``trainer.cuda_graphs``), or else the eager
    recomputes: gated MLPs' act(gate) (``trainer.recompute_mlp_act``; everything but their input with
    ``trainer.recompute_mlp``) and frozen RMSNorms' fp32 upcast
    (``trainer.recompute_norm_upcast``). Inductor already recomputes such ops in compiled blocks."""
    stack = ExitStack()
    if t.compile:
        stack.enter_context(compiled_layers(tuned.base_model, t.cuda_graphs))
        return stack
    if t.recompute_mlp or t.recompute_mlp_act:
        stack.enter_context(lean_gated_mlps(tuned.base_model, recompute_projections=t.recompute_mlp))
    if t.recompute_norm_upcast:
        stack.enter_context(lean_rms_norms(tuned.base_model))
    return stack


def prefix_cache(tuned: TunedModel, t: TrainerConfig, job_dir: Path | None) -> PrefixCache | None:
    if not (t.prefix_cache and isinstance(tuned, ReftModel)) or min(tuned.layer_ids) == 0:
        return None  # nothing frozen below the first intervened layer
    dropout = stochastic_prefix(tuned.model, min(tuned.layer_ids))
    if dropout is not None:
        print(f"reft-lab: trainer.prefix_cache is off for this model: dropout below the lowest intervened layer ({dropout})")
        return None
    cache = PrefixCache(int(t.prefix_cache_gb * 2**30), DTYPES[t.prefix_cache_dtype] if t.prefix_cache_dtype else None,
                        job_dir / "prefix_cache" if (t.prefix_cache_spill and job_dir) else None)
    cache.bind(tuned.model, min(tuned.layer_ids), tuned.base_fingerprint or fingerprint(tuned.base_model))
    return cache


