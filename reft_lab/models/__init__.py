"""Loading causal LMs (hub id, local directory, embedded GGUF, tiny test models, meta device)."""

from reft_lab.models.layers import decoder_layers, hidden_size
from reft_lab.models.loading import LoadedModel, ModelConfig, load_model

__all__ = ["LoadedModel", "ModelConfig", "decoder_layers", "hidden_size", "load_model"]
