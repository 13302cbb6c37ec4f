"""ReFT methods: interventions on the residual stream of a frozen causal LM.

Each chosen decoder layer gets a forward hook that edits its output at the prompt positions of the
current batch: gather the selected rows once, add each intervention's Δ, scatter back. Positions
are built once per batch (``reft_lab.positions``), and the interventions' factors once per forward
(``ReftModel._factors``), never per hook.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from reft_lab.errors import ConfigError, config_error
from reft_lab.interventions import INTERVENTIONS
from reft_lab.interventions.edit import edit_rows, low_rank_edit
from reft_lab.methods.base import MethodConfig, TunedModel
from reft_lab.models.layers import decoder_layers, hidden_size
from reft_lab.models.loading import DTYPES
from reft_lab.positions import Positions, PositionSpec, prompt_positions


@dataclass(kw_only=True)
class ReftConfig(MethodConfig):
    """Shared by every registered intervention (loreft, direft, noreft, ...)."""

    name: str = "loreft"
    lr: float = 2e-3
    rank: int = 4  # r: higher = more capacity, 2·r·d + r parameters per intervention
    layers: list[int] | str = "all"  # decoder layers whose output is edited: indices, "all", or N spread over a span ("spread:4", "late:2")
    positions: str = "f3+l3"  # first/last prompt tokens edited (paper §4)
    tied: bool = False  # true: one intervention per layer for all positions; false: one per group
    dropout: float = 0.0  # on the edit only
    dtype: str | None = None  # intervention parameters; null = float32 whatever the base's dtype (trainable state in full precision, as peft keeps LoRA's)
    impl: str = "auto"  # auto: fused Triton kernel on CUDA where it applies, else eager; triton; eager

    def __post_init__(self):
        super().__post_init__()
        if self.name not in INTERVENTIONS:
            raise config_error("method", self.name, f"one of {', '.join(sorted(INTERVENTIONS))}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise config_error("method.rank", self.rank, "an integer ≥ 1 (and ≤ the model's hidden size)")
        if isinstance(self.layers, str):
            span, _, count = self.layers.partition(":")
            if self.layers != "all" and not (span in LAYER_SPANS and count.isdigit() and int(count) >= 1):
                raise config_error("method.layers", self.layers, LAYERS_ALLOWED)
        else:
            self.layers = list(self.layers)
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise config_error("method.layers", self.layers, LAYERS_ALLOWED)
            if len(set(self.layers)) != len(self.layers):
                raise config_error("method.layers", self.layers, "layer indices without repeats")
        if not isinstance(self.tied, bool):
            raise config_error("method.tied", self.tied, "true or false")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise config_error("method.dropout", self.dropout, "a number in [0, 1)")
        if self.impl not in IMPLS:
            raise config_error("method.impl", self.impl, f"one of {', '.join(IMPLS)}")
        if self.impl == "triton" and self.dropout:
            raise config_error("method.impl", self.impl, "auto or eager when method.dropout > 0 (the kernel has no dropout)")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise config_error("method.dtype", self.dtype, f"null or one of {', '.join(DTYPES)}")
        self.spec  # parse now: a malformed spec fails at config time

    def check_device(self, device: torch.device, dtype: torch.dtype, hidden: int) -> None:
        """impl=triton needs the fused kernel to run where the model runs."""
        if self.impl == "triton":
            from reft_lab.kernels import kernel_problem

            problem = kernel_problem(device, dtype, hidden, self.rank)
            if problem:
                raise config_error("method.impl", "triton", f"auto or eager: the fused kernel cannot run here ({problem})")

    @cached_property
    def spec(self) -> PositionSpec:
        return PositionSpec.parse(self.positions)

    def layer_indices(self, n_layers: int) -> list[int]:
        if self.layers == "all":
            return list(range(n_layers))
        if isinstance(self.layers, str):  # N layers evenly spaced over a span, whatever the model's depth
            name, count = self.layers.split(":")
            start, stop = (round(bound * n_layers) for bound in LAYER_SPANS[name])
            if int(count) > stop - start:
                raise config_error("method.layers", self.layers,
                                   f"at most {stop - start} layer(s) in {name!r} (layers {start}–{stop - 1} of this model's {n_layers})")
            return [start + int((i + 0.5) * (stop - start) / int(count)) for i in range(int(count))]
        bad = [i for i in self.layers if not 0 <= i < n_layers]
        if bad:
            raise config_error("method.layers", self.layers, f"indices in [0, {n_layers - 1}] (this model has {n_layers} layers)")
        return sorted(self.layers)


IMPLS = ("auto", "triton", "eager")
# "<span>:N": N layers evenly spaced over that share of the model's depth (thirds for early/middle/late)
LAYER_SPANS = {"spread": (0, 1), "early": (0, 1 / 3), "middle": (1 / 3, 2 / 3), "late": (2 / 3, 1)}
LAYERS_ALLOWED = ("a non-empty list of layer indices without repeats, 'all', or '<span>:N' "
                  f"(N ≥ 1 layers evenly spaced; span one of {', '.join(LAYER_SPANS)})")


def intervention_key(layer: int, group: str) -> str:
    return f"layer{layer}" if group == "all" else f"layer{layer}_{group}"


class StackedFactors(nn.Module):
    """K adapters' low-rank factors of one intervention: A, B [K, r, d], b [K, r]. Buffers, so they
    move with the model; not persistent, so they never enter a state dict or an adapter file."""

    def __init__(self, factors: list[torch.Tensor]):
        super().__init__()
        for name, tensor in zip(("A", "B", "b"), factors):
            self.register_buffer(name, tensor, persistent=False)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.A, self.B, self.b


class ReftModel(TunedModel):
    """A frozen causal LM whose chosen decoder-layer outputs are edited by interventions."""

    def __init__(self, model: nn.Module, config: ReftConfig):
        super().__init__(model, config)
        model.requires_grad_(False)
        blocks = decoder_layers(model)
        d = hidden_size(model)
        if config.rank > d:
            raise config_error("method.rank", config.rank, f"an integer in [1, {d}] (the model's hidden size)")
        self.layer_ids = config.layer_indices(len(blocks))
        self.groups = config.spec.groups(config.tied)
        param = next(model.parameters())
        # AdamW steps on bf16 weights round away updates below their 8-bit mantissa: trainable state
        # stays fp32 on a bf16 base unless asked otherwise
        dtype = DTYPES[config.dtype] if config.dtype else torch.float32
        make = INTERVENTIONS[config.name]
        with torch.device(param.device):
            self.interventions = nn.ModuleDict(
                {intervention_key(i, g): make(d, config.rank, config.dropout, dtype) for i in self.layer_ids for g in self.groups}
            )
        if param.device.type != "meta":  # a meta copy (the preflight) asks ReftConfig.check_device instead
            config.check_device(param.device, param.dtype, d)
        self._active: Positions | None = None
        # serving K adapters at once (``serve``): per-(layer, group) stacked factors, and the
        # adapter id of each row of the current batch
        self.bank: nn.ModuleDict | None = None
        self._adapter_ids: torch.Tensor | None = None
        self._expanded: tuple[int, Positions, torch.Tensor | None] | None = None  # positions repeated for beams
        self._prompt_only = False  # generate: edit the prompt pass, not the decoding steps
        self._forward_calls = 0
        self._factor_table: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._kernel_row_table: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # ``_kernel_rows``, per batch
        self._hooks = [blocks[i].register_forward_hook(self._hook(i)) for i in self.layer_ids]
        self._hooks.append(model.register_forward_pre_hook(self._count_call))

    def _count_call(self, module, args):
        """Model forward pre-hook: count the call and, when this forward edits, compute every
        intervention's factors for it, together (``Intervention.stacked_factors``). Here, before
        any layer runs: where transformers checkpoints a layer's hooks with it (4.x), factors
        first computed inside a layer would be saved by its forward and not by its recomputation."""
        self._forward_calls += 1
        self._factor_table = None  # new parameters since the last forward, maybe
        if self._edits_this_forward() and self.bank is None:
            self._factor_table = self._stacked_factors()

    def _edits_this_forward(self) -> bool:
        """Positions are set, and this is not a decoding step of ``generate`` (prompt pass only)."""
        return self._active is not None and not (self._prompt_only and self._forward_calls > 1)

    def _stacked_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        keys, modules = zip(*self.interventions.items())
        return dict(zip(keys, type(modules[0]).stacked_factors(list(modules))))

    def _factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Intervention ``key``'s (A, B, b) for this forward (computed by ``_count_call``; by the
        first edit when a layer runs outside a forward of the model)."""
        if self._factor_table is None:
            self._factor_table = self._stacked_factors()
        return self._factor_table[key]

    def _hook(self, layer: int):
        routes = [(intervention_key(layer, g), cols) for g, cols in self.groups.items()]
        sizes = [cols.stop - cols.start for _, cols in routes]  # the groups split the positions in order

        def edit_groups(rows: torch.Tensor) -> torch.Tensor:
            """Each group's rows edited by its own intervention. A split, not a slice per group: its
            backward is one concatenation, where each slice's is a zero-filled copy to be summed."""
            if len(routes) == 1:
                return self.interventions[routes[0][0]].edit(rows, self._factors(routes[0][0]))
            return torch.cat([self.interventions[key].edit(part, self._factors(key))
                              for (key, _), part in zip(routes, rows.split(sizes, 1))], 1)

        def edit_output(module, args, output):
            if not self._edits_this_forward():
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            positions, adapter_ids = self._rows_of(hidden.shape[0])
            fused = self._fused(hidden)
            if fused and self.bank is None:  # the kernel, at rows flattened once per batch
                from reft_lab.kernels import fused_edit_rows

                for key, cols in routes:
                    hidden = fused_edit_rows(hidden, *self._kernel_rows(positions, cols, hidden.shape[1]), *self._factors(key))
            elif self.bank is not None:  # each row its own adapter
                from reft_lab.kernels import fused_low_rank_edit as bank_edit

                edit = bank_edit if fused else low_rank_edit
                for key, cols in routes:
                    hidden = edit(hidden, positions.index[:, cols], positions.valid[:, cols], *self.bank[key].factors(), adapter_ids)
            else:
                hidden = edit_rows(hidden, positions.index, positions.valid, edit_groups, in_place=True, coords=positions.coords)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return edit_output

    def _rows_of(self, rows: int) -> tuple[Positions, torch.Tensor | None]:
        """The positions (and adapter ids) for a layer output of ``rows`` rows. ``generate`` with
        beams or several sequences per prompt runs k copies of each prompt, repeated in place
        (row i → rows i·k … i·k + k − 1): each copy gets its prompt's positions, so every beam
        and every returned sequence is edited."""
        positions, batch = self._active, self._active.index.shape[0]
        if rows == batch:
            return positions, self._adapter_ids
        if rows % batch:
            raise ConfigError(f"a decoder layer received {rows} rows for a batch of {batch} prompts: "
                              "reft_lab edits each row at its prompt's positions and cannot tell which prompt these are")
        if self._expanded is None or self._expanded[0] != rows:
            k = rows // batch
            ids = None if self._adapter_ids is None else self._adapter_ids.repeat_interleave(k)
            self._expanded = (rows, Positions(positions.index.repeat_interleave(k, 0), positions.valid.repeat_interleave(k, 0)), ids)
        return self._expanded[1], self._expanded[2]

    def _kernel_rows(self, positions: Positions, cols: slice, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's (rows, flags) for one group of positions, computed at the first edited layer
        of a batch and reused by the others (four ops fewer per later layer and group)."""
        key = (positions.index.shape[0], cols.start, cols.stop, width)  # the batch's rows fix the positions (``_rows_of``)
        if key not in self._kernel_row_table:
            from reft_lab.kernels import flat_rows

            self._kernel_row_table[key] = flat_rows(positions.index[:, cols], positions.valid[:, cols], width)
        return self._kernel_row_table[key]

    def _fused(self, hidden: torch.Tensor) -> bool:
        """The fused kernel for this call? triton: always (checked at attach); auto: on CUDA where
        it applies and no dropout is active; eager: never."""
        impl = self.config.impl
        if impl == "eager" or (impl == "auto" and not hidden.is_cuda):
            return False
        if impl == "triton":
            return True
        from reft_lab.kernels import triton_usable

        return triton_usable(hidden, self.config.rank) is None and not (self.training and self.config.dropout)

    def serve(self, factor_sets: list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]) -> None:
        """Serve K adapters of this layout at once: ``factor_sets[k]`` maps each intervention key to
        adapter k's (A, B, b). Forward and generate then take ``adapter_ids`` (one per row)."""
        keys = set(self.interventions)
        for k, factors in enumerate(factor_sets):
            if set(factors) != keys:
                raise ConfigError(f"adapter {k}: interventions {sorted(factors)[:3]} do not match this layout {sorted(keys)[:3]}")
        self.bank = nn.ModuleDict({key: StackedFactors([torch.stack([f[key][i].detach() for f in factor_sets]) for i in range(3)])
                                   for key in keys})

    def remove_hooks(self) -> None:
        """Detach from the base model: its layers run unedited afterwards."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _check_adapter_ids(self, adapter_ids, batch: int):
        if self.bank is None:
            if adapter_ids is not None:
                raise ConfigError("adapter_ids given, but this model serves one adapter (see adapters.load_adapter_bank)")
            return None
        n = next(iter(self.bank.values())).A.shape[0]
        if adapter_ids is None:
            raise ConfigError(f"this model serves {n} adapters: pass adapter_ids, one id in [0, {n - 1}] per row")
        adapter_ids = torch.as_tensor(adapter_ids, device=self._active.index.device)
        if adapter_ids.shape != (batch,) or (batch and not (0 <= int(adapter_ids.min()) and int(adapter_ids.max()) < n)):
            raise ConfigError(f"adapter_ids {adapter_ids.tolist()}: expected {batch} ids in [0, {n - 1}], one per row")
        return adapter_ids

    @contextmanager
    def editing(self, input_ids, attention_mask, prompt_lengths=None, prompt_only=False, adapter_ids=None):
        """Positions for this batch. In training they stay set until the next batch: gradient
        checkpointing re-runs the layers (and so the edit) during backward, after forward returned."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._active = prompt_positions(self.config.spec, attention_mask, prompt_lengths)
        self._adapter_ids = self._check_adapter_ids(adapter_ids, input_ids.shape[0])
        self._expanded = None
        self._kernel_row_table = {}
        self._prompt_only, self._forward_calls = prompt_only, 0
        try:
            yield attention_mask
        finally:
            if not (self.training and torch.is_grad_enabled()) or prompt_only:
                self._active, self._prompt_only, self._adapter_ids = None, False, None

    def train(self, mode: bool = True):
        self._active = None  # positions of a training batch never leak into evaluation
        self._factor_table = None
        return super().train(mode)

    def forward(self, input_ids, attention_mask=None, prompt_lengths=None, adapter_ids=None, **kwargs):
        with self.editing(input_ids, attention_mask, prompt_lengths, adapter_ids=adapter_ids) as mask:
            return self.model(input_ids=input_ids, attention_mask=mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, adapter_ids=None, **kwargs):
        """At inference the prompt is the input: its positions are edited in the prompt pass only."""
        with self.editing(input_ids, attention_mask, prompt_only=True, adapter_ids=adapter_ids) as mask:
            return self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)

    def no_decay_parameter_names(self) -> set[str]:
        names = super().no_decay_parameter_names()
        for key, intervention in self.interventions.items():
            names |= {f"interventions.{key}.{p}" for p in intervention.no_decay}
        return names


def attach_reft(model, config: ReftConfig) -> ReftModel:
    return ReftModel(model, config)
