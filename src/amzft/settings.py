"""Settings groups (typed dataclasses) read back from a parsed config or a checkpoint's saved
hyper-parameters (groups as dicts or namespaces): ``init_kwargs`` turns either into constructor arguments."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any


def as_dict(value: Any) -> dict:
    """A group's values as a plain dict, whatever it came as."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "as_dict"):  # jsonargparse's Namespace
        return value.as_dict()
    return dict(value) if isinstance(value, Mapping) else {}


def _grouped(saved: Any, groups: Mapping[str, type]) -> dict:
    """``saved`` as a plain dict, each of ``groups`` a plain dict too."""
    return {key: as_dict(value) if key in groups else value for key, value in as_dict(saved).items()}


def init_kwargs(cls: type, saved: Any) -> dict:
    """The arguments ``cls(...)`` accepts, groups as their types; private (``_instantiator``) and
    unknown keys are dropped."""
    accepted = inspect.signature(cls.__init__).parameters
    groups = getattr(cls, "GROUPS", {})
    kwargs = {}
    for key, value in _grouped(saved, groups).items():
        if key.startswith("_") or key not in accepted:
            continue
        if key in groups:
            known = {f.name for f in dataclasses.fields(groups[key])}
            value = groups[key](**{k: v for k, v in value.items() if k in known})
        kwargs[key] = value
    return kwargs


def with_overrides(cls: type, saved: Any, overrides: Mapping) -> dict:
    """``init_kwargs`` of ``saved`` with ``overrides`` applied on top; an override of a group
    (``compute={"quantization": "none"}``) replaces only the options it names."""
    groups = getattr(cls, "GROUPS", {})
    merged = _grouped(saved, groups)
    for key, value in overrides.items():
        merged[key] = {**merged.get(key, {}), **as_dict(value)} if key in groups else value
    return init_kwargs(cls, merged)


def hyperparameters(kwargs: Mapping) -> dict:
    """What a checkpoint saves of the constructor's arguments: plain values, groups as dicts
    (a checkpoint is read with ``weights_only``, which refuses arbitrary classes)."""
    return {k: as_dict(v) if dataclasses.is_dataclass(v) else v for k, v in kwargs.items()}
