"""``trainer``: the training budget and the switches of the hot path (the one place their defaults live)."""

from __future__ import annotations

from dataclasses import dataclass, field

from reft_lab.errors import config_error
from reft_lab.models.loading import DTYPES


@dataclass(kw_only=True)
class TrainerConfig:
    max_steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    bf16: bool = True
    log_every: int = 1
    group_by_length: bool = False  # batches of similar length (less padding); changes the data order
    gradient_checkpointing: bool = False  # recompute layer activations in backward: less memory, slower
    compile: bool = False  # torch.compile each decoder block: fused pointwise ops, faster steps after a cold compile (README)
    cuda_graphs: bool = False  # with compile, on CUDA: replay each compiled block as a CUDA graph (small, launch-bound models)
    pad_to_multiple: int | None = None  # batch lengths padded up to a multiple: fewer shapes to compile and capture (null: 64 with cuda_graphs, else 1)
    recompute_mlp_act: bool = True  # gated MLPs recompute act(gate) in backward instead of saving it (eager path)
    recompute_mlp: bool = False  # gated MLPs save only their input, recompute gate, up and act in backward: less memory, a slower step
    recompute_norm_upcast: bool = True  # frozen RMSNorms save a bf16/fp16 input, not its fp32 upcast (eager path)
    prefix_cache: bool = True  # ReFT: reuse frozen activations below the lowest intervened layer (epochs ≥ 2)
    prefix_cache_gb: float = 2.0  # memory bound of the cache
    prefix_cache_dtype: str | None = None  # null = the model's dtype; bfloat16 halves the cache
    prefix_cache_spill: bool = False  # past the bound, spill entries to <job dir>/prefix_cache
    checkpoint_every: int = 25  # steps between checkpoints; 0 = only on SIGTERM/SIGINT
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: bool = True  # continue from the job directory's newest complete checkpoint
    eval_at: list[int] = field(default_factory=list)  # steps before the last at which to run the whole evaluation too (metrics.json "curve")

    def __post_init__(self):
        if self.checkpoint_every < 0:
            raise config_error("trainer.checkpoint_every", self.checkpoint_every, "an integer ≥ 0 (0 = only on SIGTERM/SIGINT)")
        if self.prefix_cache_gb <= 0:
            raise config_error("trainer.prefix_cache_gb", self.prefix_cache_gb, "a number > 0")
        if self.prefix_cache_dtype is not None and self.prefix_cache_dtype not in DTYPES:
            raise config_error("trainer.prefix_cache_dtype", self.prefix_cache_dtype, f"null or one of {', '.join(DTYPES)}")
        if self.cuda_graphs and not self.compile:
            raise config_error("trainer.cuda_graphs", True, "false unless trainer.compile=true (the graphs replay the compiled blocks)")
        if self.cuda_graphs and self.gradient_checkpointing:  # blocks re-run inside backward: not a combination tested on a GPU
            raise config_error("trainer.cuda_graphs", True, "false with trainer.gradient_checkpointing=true (not supported together)")
        if self.recompute_mlp and self.compile:  # inductor decides what compiled blocks save and recompute
            raise config_error("trainer.recompute_mlp", True, "false with trainer.compile=true (compiled blocks choose their own recomputation)")
        if self.pad_to_multiple is not None and (isinstance(self.pad_to_multiple, bool) or not isinstance(self.pad_to_multiple, int)
                                                 or self.pad_to_multiple < 1):
            raise config_error("trainer.pad_to_multiple", self.pad_to_multiple, "null or an integer ≥ 1")
        if self.keep_checkpoints < 1:
            raise config_error("trainer.keep_checkpoints", self.keep_checkpoints, "an integer ≥ 1")
        for key in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                raise config_error(f"trainer.{key}", getattr(self, key), "an integer ≥ 1")
        if self.lr is not None and not self.lr > 0:
            raise config_error("trainer.lr", self.lr, "null (the method's default) or a number > 0")
        if self.weight_decay < 0:
            raise config_error("trainer.weight_decay", self.weight_decay, "a number ≥ 0")
        if not 0 <= self.warmup_ratio < 1:
            raise config_error("trainer.warmup_ratio", self.warmup_ratio, "a number in [0, 1)")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < self.max_steps for s in self.eval_at):
            raise config_error("trainer.eval_at", list(self.eval_at), f"a list of steps in [1, {self.max_steps - 1}] (below trainer.max_steps)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise config_error("trainer.max_grad_norm", self.max_grad_norm, "null or a number > 0")

    @property
    def length_multiple(self) -> int:
        """What batch lengths are padded up to a multiple of (``pad_to_multiple``; null: 64 where CUDA
        graphs are captured, one graph per length, else 1)."""
        if self.pad_to_multiple is not None:
            return self.pad_to_multiple
        return 64 if self.cuda_graphs else 1
