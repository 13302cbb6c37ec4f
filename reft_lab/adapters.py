"""Adapters on disk, and import/export of pyreft's layout (``config.json`` + ``intkey_*.bin``).

An adapter directory holds ``adapter_model.safetensors`` (no pickle) and ``reft_lab_adapter.json``:
the method (name, layers, positions, tied, rank, ...), the parameter dtype and the base model's
identity (name, dtype, fingerprint); loading onto another base is refused. LoRA and DoRA adapters are
peft's format as well: peft's ``adapter_config.json`` beside tensors under peft's names, so
``PeftModel.from_pretrained``, transformers' ``load_adapter`` and vLLM read the directory as it is.
Directories of the earlier layout (reft_lab's metadata in ``adapter_config.json``) still load.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from reft_lab import __version__
from reft_lab.accounting import ADAPTER_METADATA, fingerprint
from reft_lab.atomic import atomic_write, atomic_write_json
from reft_lab.errors import AdapterError, ReftLabError
from reft_lab.interventions import INTERVENTIONS
from reft_lab.methods import ReftModel, TunedModel, attach, method_config
from reft_lab.methods.reft import intervention_key
from reft_lab.models.layers import decoder_layers, hidden_size, weights_dtype

CONFIG_FILE = "reft_lab_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
FORMAT = "reft_lab.adapter/2"  # tensors under the saved format's names (peft's for LoRA/DoRA)
LEGACY_FORMAT = "reft_lab.adapter/1"  # metadata in adapter_config.json, tensors under reft_lab's names


def base_identity(tuned: TunedModel) -> dict:
    config = tuned.base_model.config
    return {
        "name_or_path": tuned.base_name,
        # a base loaded in another dtype has other weights, so another fingerprint: serving loads this one
        "dtype": tuned.base_dtype or weights_dtype(tuned.base_model),
        "fingerprint": tuned.base_fingerprint or fingerprint(tuned.base_model),
        "model_type": getattr(config, "model_type", None),
        "model_class": type(tuned.base_model).__name__,
    }


def save_adapter(tuned: TunedModel, directory: str | Path) -> Path:
    """Write the trainable state and its config; the weights land before the config names them."""
    directory = Path(directory)
    state = {name: p.detach().to("cpu").contiguous() for name, p in tuned.saved_state().items()}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    config = {
        "format": FORMAT,
        "method": asdict(tuned.config),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "base": base_identity(tuned),
        "reft_lab_version": __version__,
    }
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata=ADAPTER_METADATA))
    peft_config = tuned.peft_config()
    if peft_config is not None:
        atomic_write_json(directory / PEFT_CONFIG_FILE, peft_config)
    atomic_write_json(directory / CONFIG_FILE, config)
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {directory} does not exist")
    path = directory / CONFIG_FILE
    legacy = not path.exists() and (directory / PEFT_CONFIG_FILE).exists()
    if legacy:
        path = directory / PEFT_CONFIG_FILE
    elif not path.exists():
        raise AdapterError(f"{path} is missing: not a reft_lab adapter directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != (LEGACY_FORMAT if legacy else FORMAT) or "method" not in config:
        raise AdapterError(f"{path}: not a reft_lab adapter (format is not {FORMAT!r})")
    return config


def _check_base(directory: Path, recorded: dict, model: torch.nn.Module, actual: str | None) -> None:
    if recorded.get("fingerprint") and actual is not None and actual != recorded["fingerprint"]:
        dtype, wanted = weights_dtype(model), recorded.get("dtype")
        how = (f"load the base in {wanted}, as it was trained (this one is {dtype})" if wanted and wanted != dtype
               else "load it onto the same base model")
        raise AdapterError(
            f"adapter {directory} was trained on base {recorded.get('name_or_path')!r} "
            f"(fingerprint {recorded['fingerprint'][:12]}); this model's fingerprint is {actual[:12]}: {how}"
        )


def load_adapter(model: torch.nn.Module, directory: str | Path, base_name: str = "", check_base: bool = True) -> TunedModel:
    """Attach the saved method to ``model`` (the untouched base) and load its weights."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    recorded = config.get("base", {})
    if check_base:
        _check_base(directory, recorded, model, fingerprint(model))
    try:
        state = load_file(directory / WEIGHTS_FILE)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{directory / WEIGHTS_FILE} cannot be read: {err}") from err
    bad = sorted(name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise AdapterError(f"{directory / WEIGHTS_FILE}: tensor {bad[0]} holds NaN or infinite values "
                           f"({len(bad)} such tensors): the run that wrote it diverged")
    try:
        tuned = attach(model, config["method"], base_name=base_name or recorded.get("name_or_path", ""))
        if config["format"] == LEGACY_FORMAT:
            tuned.load_trainable_state(state, source=str(directory / WEIGHTS_FILE))
        else:
            tuned.load_saved_state(state, source=str(directory / WEIGHTS_FILE))
    except ReftLabError as err:
        raise AdapterError(f"adapter {directory}: {err}") from err
    tuned.base_fingerprint = recorded.get("fingerprint")
    return tuned


BANK_LAYOUT = ("layers", "positions", "tied", "rank")  # what K adapters served together must share


def _layout(method: dict, key: str, model: torch.nn.Module):
    """One key of an adapter's layout, as it applies to ``model``: layers as the indices they name
    (``late:4`` and the list of those four layers are one layout)."""
    if key == "layers":
        return method_config(method).layer_indices(len(decoder_layers(model)))
    return method.get(key)


def load_adapter_bank(model: torch.nn.Module, directories: list[str | Path], base_name: str = "") -> ReftModel:
    """Serve several ReFT adapters of one base model and one layout at once: the returned model's
    ``generate``/``forward`` take ``adapter_ids`` and edit row i with adapter ``adapter_ids[i]``
    (one pass for a batch mixing many users' adapters). LoReFT, NoReFT and DiReFT adapters mix: each
    is stacked as its low-rank factors. Inference only."""
    if not directories:
        raise AdapterError("no adapter directories given")
    configs = [read_adapter_config(d) for d in directories]
    first = configs[0]["method"]
    for directory, config in zip(directories, configs):
        if config["method"]["name"] not in INTERVENTIONS:
            raise AdapterError(f"adapter {directory}: method {config['method']['name']!r} is not a ReFT method; "
                               "only ReFT adapters can be served together")
        for key in BANK_LAYOUT:
            if _layout(config["method"], key, model) != _layout(first, key, model):
                raise AdapterError(f"adapter {directory}: method.{key} is {config['method'].get(key)!r}, but "
                                   f"{directories[0]} has {first.get(key)!r}; adapters served together share {', '.join(BANK_LAYOUT)}")
    actual = fingerprint(model)
    factor_sets = []
    for directory, config in zip(directories, configs):
        _check_base(directory, config.get("base", {}), model, actual)
        tuned = load_adapter(model, directory, base_name, check_base=False)
        with torch.no_grad():
            factor_sets.append({key: intervention.factors() for key, intervention in tuned.interventions.items()})
        tuned.remove_hooks()
    dtypes = {factors[0].dtype for fs in factor_sets for factors in fs.values()}
    if len(dtypes) > 1:
        raise AdapterError(f"adapters {[str(d) for d in directories]} mix parameter dtypes {sorted(map(str, dtypes))}: save them in one dtype")
    served = attach(model, first, base_name=base_name or configs[0].get("base", {}).get("name_or_path", ""), base_fingerprint=actual)
    served.serve(factor_sets)
    return served.eval()


# --- pyreft layout ---------------------------------------------------------------------------

_PYREFT_TYPES = {
    "loreft": "pyreft.interventions.LoreftIntervention",
    "noreft": "pyreft.interventions.NoreftIntervention",
    "direft": "pyreft.interventions.NodireftIntervention",
}
_FROM_PYREFT = {cls.rsplit(".", 1)[1]: name for name, cls in _PYREFT_TYPES.items()}


def _to_pyreft_state(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if name == "loreft":
        from reft_lab.interventions import orthonormal_rows

        return {"weight": tensors["W"], "bias": tensors["b"], "rotate_layer": orthonormal_rows(tensors["rotation"]).T.contiguous()}
    if name == "noreft":
        return {"proj_layer.weight": tensors["R"], "learned_source.weight": tensors["W"], "learned_source.bias": tensors["b"]}
    return {"proj_layer.weight": tensors["W2"], "learned_source.weight": tensors["W1"], "learned_source.bias": tensors["b"]}


def _from_pyreft_state(name: str, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    try:
        if name == "loreft":
            return {"rotation": state["rotate_layer"].T.contiguous(), "W": state["weight"], "b": state["bias"]}
        if "proj_layer.bias" in state:
            raise AdapterError(f"{source}: proj_layer has a bias (add_bias=True), which {name} does not model")
        key = "R" if name == "noreft" else "W2"
        main = {"W": "W", "b": "b"} if name == "noreft" else {"W": "W1", "b": "b"}
        return {key: state["proj_layer.weight"], main["W"]: state["learned_source.weight"], main["b"]: state["learned_source.bias"]}
    except KeyError as err:
        raise AdapterError(f"{source}: tensor {err} missing for a pyreft {name} intervention") from err


def export_pyreft(tuned: ReftModel, directory: str | Path) -> Path:
    """Write pyreft's layout (pickled ``.bin`` state dicts: its format, readable by pyreft.ReftModel.load)."""
    if not isinstance(tuned, ReftModel) or tuned.config.name not in _PYREFT_TYPES:
        raise AdapterError(f"export to pyreft supports {sorted(_PYREFT_TYPES)}, not method={tuned.config.name}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    d, rank = hidden_size(tuned.model), tuned.config.rank
    keys, representations = [], []
    for layer in tuned.layer_ids:
        for j, group in enumerate(tuned.groups):
            key = f"layer_{layer}_comp_block_output_unit_pos_nunit_1#{j}"
            intervention = tuned.interventions[intervention_key(layer, group)]
            tensors = {n: p.detach().cpu() for n, p in intervention.named_parameters()}
            torch.save(_to_pyreft_state(tuned.config.name, tensors), directory / f"intkey_{key}.bin")
            keys.append(key)
            representations.append([layer, "block_output", "pos", 1, rank] + [None] * 9)
    config = {
        "intervention_constant_sources": [True] * len(keys),
        "intervention_dimensions": [d] * len(keys),
        "intervention_types": [f"<class '{_PYREFT_TYPES[tuned.config.name]}'>"] * len(keys),
        "mode": "parallel",
        "representations": representations,
        "sorted_keys": keys,
    }
    atomic_write_json(directory / "config.json", config)
    return directory


def import_pyreft(model: torch.nn.Module, directory: str | Path, positions: str, base_name: str = "", lr: float | None = None) -> ReftModel:
    """Load a pyreft-saved directory onto ``model``. pyreft does not store positions: pass them.

    One intervention per layer with an f+l spec means tied; two mean untied (#0 first, #1 last).
    """
    directory = Path(directory)
    path = directory / "config.json"
    if not path.exists():
        raise AdapterError(f"{path} is missing: not a pyreft save directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        keys, types, reprs = config["sorted_keys"], config["intervention_types"], config["representations"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not a pyreft config: {err}") from err
    class_names = {t.replace("<class '", "").replace("'>", "").rsplit(".", 1)[-1] for t in types}
    names = {_FROM_PYREFT.get(c) for c in class_names}
    if len(names) != 1 or None in names:
        raise AdapterError(f"{path}: intervention types {sorted(class_names)} are not one of {sorted(_FROM_PYREFT)}")
    name = names.pop()
    per_layer: dict[int, list[str]] = {}
    for key, rep in zip(keys, reprs):
        if rep[1] != "block_output":
            raise AdapterError(f"{path}: component {rep[1]!r} of {key}; only block_output is supported")
        per_layer.setdefault(int(rep[0]), []).append(key)
    counts = {len(v) for v in per_layer.values()}
    if len(counts) != 1 or counts.pop() > 2:
        raise AdapterError(f"{path}: {sorted(per_layer.items())} — expected 1 or 2 interventions on every layer")
    states = {}
    for key in keys:
        file = directory / f"intkey_{key}.bin"
        try:
            states[key] = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  (torch raises many types for a bad pickle)
            raise AdapterError(f"{file} cannot be read with weights_only=True: {err}") from err
    first_state = _from_pyreft_state(name, states[keys[0]], str(directory))
    rank = next(iter(first_state.values())).shape[0]
    untied = len(next(iter(per_layer.values()))) == 2
    fields = {"name": name, "rank": rank, "layers": sorted(per_layer), "positions": positions, "tied": not untied}
    if lr is not None:
        fields["lr"] = lr
    cfg = method_config(fields)
    if untied and not (cfg.spec.first and cfg.spec.last):
        raise AdapterError(f"{path}: two interventions per layer need positions f<n>+l<n>, got {positions!r}")
    tuned = attach(model, cfg, base_name=base_name)
    state = {}
    for layer, layer_keys in per_layer.items():
        for group, key in zip(tuned.groups, sorted(layer_keys, key=lambda k: int(re.sub(r".*#", "", k)))):
            for n, t in _from_pyreft_state(name, states[key], str(directory)).items():
                state[f"interventions.{intervention_key(layer, group)}.{n}"] = t.to(next(tuned.interventions.parameters()).dtype)
    tuned.load_trainable_state(state, source=str(directory))
    return tuned


__all__ = ["export_pyreft", "import_pyreft", "load_adapter", "read_adapter_config", "save_adapter"]
