"""Up-front limits of a training job: the longest sequence the model takes, and whether one step's
activations can fit in the memory there is. Both fail as one line before evaluation and training."""

from __future__ import annotations

import torch

from reft_lab.data.batching import EncodedExample
from reft_lab.errors import ConfigError, config_error
from reft_lab.models.layers import context_length, decoder_layers, hidden_size

# Activation elements a decoder layer saves per token for backward, in units of the hidden size:
# about 17·d for a transformer block with fused (flash/SDPA) attention (Korthikanti et al. 2022,
# "Reducing Activation Recomputation in Large Transformer Models": 34·s·b·h bytes in 16-bit, without
# the attention-score term that SDPA does not store). An estimate, used only to refuse a step that
# cannot fit, with a margin left to the caller.
SAVED_PER_TOKEN_LAYER = 17


def max_length(model: torch.nn.Module, requested: int | None) -> int | None:
    """``task.max_length``, or the model's context when null; refuses a length beyond the context."""
    context = context_length(model)
    if requested is not None and context is not None and requested > context:
        raise config_error("task.max_length", requested, f"null or an integer ≤ {context} (the model's context)")
    return requested if requested is not None else context


def step_activation_bytes(model: torch.nn.Module, batch_size: int, tokens: int, supervised: int,
                          checkpointing: bool, dtype: torch.dtype) -> int:
    """Estimated activation memory of one micro-batch of ``batch_size`` rows of ``tokens`` tokens:
    the layers' saved activations (one layer's at a time with gradient checkpointing, plus each
    layer's input) and the fp32 logits of ``supervised`` positions per row."""
    d, layers = hidden_size(model), len(decoder_layers(model))
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    per_token = (layers + SAVED_PER_TOKEN_LAYER) * d if checkpointing else layers * SAVED_PER_TOKEN_LAYER * d
    element = torch.finfo(dtype).bits // 8
    return batch_size * (tokens * per_token * element + supervised * vocab * 4 * 2)


def free_bytes(device: torch.device) -> int | None:
    """Memory a step could use now: free GPU memory, or the host's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_step_fits(model: torch.nn.Module, data: list[EncodedExample], sources: list[str], batch_size: int,
                    checkpointing: bool, dtype: torch.dtype) -> None:
    """Refuse a run whose longest batch would need more activation memory than is free."""
    if not data:
        return
    longest = max(range(len(data)), key=lambda i: len(data[i].prompt) + len(data[i].response))
    tokens = len(data[longest].prompt) + len(data[longest].response)
    need = step_activation_bytes(model, batch_size, tokens, len(data[longest].response), checkpointing, dtype)
    free = free_bytes(next(model.parameters()).device)
    if free is not None and need > free:
        raise ConfigError(
            f"one training step would need about {need / 2**30:.1f} GiB of activations (trainer.batch_size={batch_size} × "
            f"{tokens} tokens, the longest example{' ' + sources[longest] if sources[longest] else ''}), but "
            f"{free / 2**30:.1f} GiB are free: lower trainer.batch_size, set task.max_length, or set "
            "trainer.gradient_checkpointing=true")
