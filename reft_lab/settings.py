"""One run's composed config as typed sections, validated before anything heavy happens, and the
fingerprint of the settings that decide its numbers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

import torch
from omegaconf import DictConfig

from reft_lab.config import build_section
from reft_lab.errors import ConfigError, config_error
from reft_lab.evaluation.retention import RETENTION_METRICS, retention_keys
from reft_lab.evaluation.suite import EvalConfig
from reft_lab.loggers import LoggerConfig
from reft_lab.methods import MethodConfig, attach, method_config
from reft_lab.metrics import SCHEMA
from reft_lab.models import ModelConfig
from reft_lab.models.loading import model_config_only
from reft_lab.tasks import TaskConfig
from reft_lab.training.config import TrainerConfig


@dataclass
class RunSettings:
    """The composed config, validated section by section before anything heavy happens."""

    model: ModelConfig
    method: MethodConfig
    task: TaskConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    retention: EvalConfig
    seed: int
    optimized_metric: str

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "RunSettings":
        known = {"model", "method", "task", "trainer", "logger", "retention", "seed", "optimized_metric", "skip_completed", "threads"}
        unknown = sorted(set(cfg.keys()) - known - {"experiment", "hparams_search", "hydra"})
        if unknown:
            raise ConfigError(f"{unknown[0]} is not a known top-level key: allowed are {', '.join(sorted(known))}")
        seed = cfg.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise config_error("seed", seed, f"an integer in [0, {2**32 - 1}]")
        check_threads(cfg.get("threads"))
        if not isinstance(cfg.get("skip_completed", True), bool):
            raise config_error("skip_completed", cfg.get("skip_completed"), "true or false")
        metric = cfg.get("optimized_metric")
        numeric = [k for k, (types, _, _) in SCHEMA.items() if float in types or int in types]
        if not isinstance(metric, str) or not (metric in numeric or metric.startswith("retention.")):
            raise config_error("optimized_metric", metric, f"a numeric metrics.json key ({', '.join(numeric)}) or retention.<metric>.after")
        if metric.startswith("retention.") and metric not in retention_keys():
            raise config_error("optimized_metric", metric, f"retention.<{'|'.join(RETENTION_METRICS)}>.<before|after>")
        sections, problems = {}, []
        for name, build in (("model", lambda: build_section(ModelConfig, cfg.model, "model")),
                            ("method", lambda: method_config(cfg.method)),
                            ("task", lambda: build_section(TaskConfig, cfg.task, "task")),
                            ("trainer", lambda: build_section(TrainerConfig, cfg.trainer, "trainer")),
                            ("logger", lambda: build_section(LoggerConfig, cfg.logger, "logger")),
                            ("retention", lambda: build_section(EvalConfig, cfg.retention, "retention"))):
            try:
                sections[name] = build()
            except ConfigError as err:
                problems.append(str(err))
        if problems:
            raise ConfigError("\n".join(problems))
        # model.dtype=auto decided here, for this machine: fingerprints and skips compare the dtype the
        # numbers come from (an fp32 job's record reads float32 as before the option came)
        sections["model"] = replace(sections["model"], dtype=sections["model"].resolved_dtype())
        return cls(**sections, seed=seed, optimized_metric=metric)

    def preflight(self) -> None:
        """Attach the method to a meta-device copy built from the model's config alone: layer
        indices, rank and target modules are checked in seconds, before any weights load; so is
        what the method needs of the device the weights will load on (the fused kernel's)."""
        config = model_config_only(self.model)
        if config is not None:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                attach(AutoModelForCausalLM.from_config(config), self.method)
        device = self.model.resolved_device()
        if device.type != "meta":
            self.method.check_device(device, self.model.torch_dtype(device), getattr(config, "hidden_size", 0))
        if self.trainer.cuda_graphs and device.type != "cuda":
            raise config_error("trainer.cuda_graphs", True, f"false with the model on {device.type} (CUDA graphs need CUDA)")

    def result_config(self) -> dict:
        """The settings a finished job's numbers depend on: what a skip compares."""
        return {"run": run_config(self), "retention": asdict(self.retention)}

    @property
    def lr(self) -> float:
        """The peak learning rate: trainer.lr, else the method's default."""
        return self.trainer.lr if self.trainer.lr is not None else self.method.lr


def check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise config_error("threads", threads, "null (cores ÷ jobs running at once) or an integer ≥ 1")


def run_config(settings: RunSettings) -> dict:
    """What training's numbers depend on: not logging or checkpoint cadence, and not the
    memory-for-compute switches that leave every number as it was (checkpointing, the MLP
    and norm-upcast recomputes, the cache's bound and spill, CUDA graphs: the compiled kernels replayed)."""
    trainer = {k: v for k, v in asdict(settings.trainer).items()
               if k not in ("log_every", "checkpoint_every", "keep_checkpoints", "resume",
                            "gradient_checkpointing", "recompute_mlp_act", "recompute_mlp", "recompute_norm_upcast",
                            "prefix_cache_gb", "prefix_cache_spill", "cuda_graphs", "pad_to_multiple")}
    if settings.trainer.length_multiple != 1:  # the padding in effect (CUDA graphs choose one); 1 as before the option
        trainer["pad_to_multiple"] = settings.trainer.length_multiple
    method = asdict(settings.method)
    if settings.method.name == "full" and method["dtype"] is None:  # the default since the option came: earlier checkpoints still resume
        del method["dtype"]
    return {"model": asdict(settings.model), "method": method, "task": asdict(settings.task),
            "trainer": trainer, "seed": settings.seed}


def config_fingerprint(settings: RunSettings) -> str:
    """What a checkpoint must match to be resumed (``run_config``), hashed."""
    payload = run_config(settings)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
