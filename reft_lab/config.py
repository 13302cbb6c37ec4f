"""Typed config sections: a composed Hydra section becomes a dataclass, or one clear error.

Unknown keys fail; each value is checked against its field's annotation (int, float, bool, str,
lists, unions, None) before the dataclass's own ``__post_init__`` checks ranges.
"""

from __future__ import annotations

import hashlib
import types
import typing
from dataclasses import fields
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from reft_lab.errors import ConfigError

T = TypeVar("T")

def _digest(text) -> str:
    return hashlib.sha256(str(text).encode()).hexdigest()[:12]


def job_dirname(overrides) -> str:
    """A sweep job's directory name from its overrides (Hydra's override_dirname): path separators
    become underscores; past 120 characters the name is cut and ends in a digest of the whole."""
    name = str(overrides).replace("/", "_") or "defaults"
    return name if len(name) <= 120 else f"{name[:100]}_{_digest(name)}"


# ${digest:<text>}: a short stable name, e.g. a search trial's directory from its overrides
OmegaConf.register_new_resolver("digest", _digest, replace=True)
OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)


def plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "null")
    return text.replace("<class '", "").replace("'>", "")


def build_section(cls: type[T], raw: Any, key: str) -> T:
    """Instantiate dataclass ``cls`` from config mapping ``raw`` found at ``key``."""
    raw = plain(raw)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}={raw!r} is not allowed: a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    allowed = {f.name: hints[f.name] for f in fields(cls) if f.init}
    for name, value in raw.items():
        if name not in allowed:
            raise ConfigError(f"{key}.{name} is not a known key: allowed keys are {', '.join(sorted(allowed))}")
        if not _matches(value, allowed[name]):
            raise ConfigError(f"{key}.{name}={value!r} is not allowed: expected {_describe(allowed[name])}")
    return cls(**raw)


def conf_dir():
    """The packaged configs (``reft_lab/conf``; the repository's top-level ``conf`` links to it)."""
    from pathlib import Path

    return Path(__file__).resolve().parent / "conf"


def compose(overrides: list[str], config_name: str = "train", with_hydra: bool = False) -> DictConfig:
    """Compose the Hydra config the way ``reft-lab train`` would, for commands that run no job."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from reft_lab.conf_store import register

    register()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith(("Config search path", "provider="))]
        raise ConfigError(" ".join(lines)[:400] if lines else type(err).__name__) from err
