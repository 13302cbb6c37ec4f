"""Parameter accounting and the frozen-base fingerprint: the one place where both are computed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

ADAPTER_METADATA = {"format": "pt"}
# safetensors' dtype codes, in the order its writer sorts tensors (larger alignment first)
_ST_DTYPES = {
    torch.float64: "F64", torch.int64: "I64", torch.float32: "F32", torch.int32: "I32",
    torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (tied weights counted once), on any device including meta."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Exact size of the safetensors file ``state`` would be saved as, without materialising it
    (works for meta tensors): 8-byte length + JSON header padded to 8 bytes + raw data. The writer
    lays tensors out by dtype alignment, then name; offsets in the header depend on that order."""
    order = sorted(state.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, tensor in order:
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    padded = len(text) + (-len(text)) % 8
    return 8 + padded + offset


@dataclass
class ParamReport:
    trainable_params: int
    base_params: int
    trainable_pct: float  # 100 · trainable / base
    adapter_bytes: int  # size of adapter_model.safetensors

    def to_dict(self) -> dict:
        return asdict(self)


def param_report(tuned) -> ParamReport:
    trainable = sum(p.numel() for p in tuned.trainable_state().values())
    return ParamReport(
        trainable_params=trainable,
        base_params=tuned.base_params,
        trainable_pct=100.0 * trainable / tuned.base_params if tuned.base_params else 0.0,
        adapter_bytes=safetensors_bytes(tuned.saved_state(), ADAPTER_METADATA),
    )


def _canonical(name: str) -> str | None:
    """Name of a base tensor independent of peft's wrapping; None for adapter tensors."""
    if "lora_" in name or "lora_magnitude_vector" in name:
        return None
    return name.replace(".base_layer.", ".")


def fingerprint(model: nn.Module) -> str | None:
    """SHA-256 over the base model's parameters and buffers (names, dtypes, shapes, bytes).

    Equal before and after training ⇔ the base is untouched. None for meta-device models.
    """
    digest = hashlib.sha256()
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    for raw_name, tensor in sorted(tensors, key=lambda kv: kv[0]):
        name = _canonical(raw_name)
        if name is None:
            continue
        if tensor.device.type == "meta":
            return None
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-dim buffers (GPT-2 on transformers 4.x)
    return digest.hexdigest()
