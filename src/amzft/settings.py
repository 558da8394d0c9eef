"""Settings grouped in typed dataclasses, read back from wherever they were written.

``LoraCausalLM`` and ``AmazonTitlesDataModule`` take a few plain options and a few groups
(``model.lora``, ``data.batches``, …). A section of settings arrives in several shapes: a
parsed config (groups as dicts or jsonargparse namespaces), a checkpoint's saved
hyper-parameters (groups as dicts) or a checkpoint written before the groups existed (every
option flat, under its old name). ``init_kwargs`` turns any of them into the constructor's
arguments; ``renamed_options`` finds old names in a command line or config file, so each is a
one-line error naming its new place rather than jsonargparse's "unrecognized argument".
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def as_dict(value: Any) -> dict:
    """A group's values as a plain dict, whatever it came as."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "as_dict"):  # jsonargparse's Namespace
        return value.as_dict()
    return dict(value) if isinstance(value, Mapping) else {}


def nested(saved: Any, renamed: Mapping[str, str], groups: Mapping[str, type]) -> dict:
    """``saved`` with each option of the flat layout moved into its group (``renamed``: ``lr``
    -> ``optim.lr``) and each of ``groups`` a plain dict; other keys as they were."""
    out: dict = {}
    for key, value in as_dict(saved).items():
        if key in groups:
            out.setdefault(key, {}).update(as_dict(value))
        elif key in renamed:
            group, name = renamed[key].split(".", 1)
            out.setdefault(group, {}).setdefault(name, value)
        else:
            out[key] = value
    return out


def init_kwargs(cls: type, saved: Any) -> dict:
    """The arguments ``cls(...)`` accepts, from a section in any of its shapes (module doc):
    groups become their types; Lightning's private entries (``_instantiator``) and keys another
    version or tool added to the section are dropped."""
    accepted = inspect.signature(cls.__init__).parameters
    groups = getattr(cls, "GROUPS", {})
    kwargs = {}
    for key, value in nested(saved, getattr(cls, "RENAMED", {}), groups).items():
        if key.startswith("_") or key not in accepted:
            continue
        if key in groups:
            known = {f.name for f in dataclasses.fields(groups[key])}
            value = groups[key](**{k: v for k, v in value.items() if k in known})
        kwargs[key] = value
    return kwargs


def with_overrides(cls: type, saved: Any, overrides: Mapping) -> dict:
    """``init_kwargs`` of ``saved`` with ``overrides`` applied on top, each override named
    flat (``quantization``) or grouped (``compute``), replacing only the options it names."""
    renamed, groups = getattr(cls, "RENAMED", {}), getattr(cls, "GROUPS", {})
    merged = nested(saved, renamed, groups)
    for key, value in overrides.items():
        if key in renamed:
            group, name = renamed[key].split(".", 1)
            merged.setdefault(group, {})[name] = value
        elif key in groups:
            merged[key] = {**merged.get(key, {}), **as_dict(value)}
        else:
            merged[key] = value
    return init_kwargs(cls, merged)


def hyperparameters(kwargs: Mapping) -> dict:
    """What a checkpoint saves of the constructor's arguments: plain values, groups as dicts
    (a checkpoint is read with ``weights_only``, which refuses arbitrary classes)."""
    return {k: as_dict(v) if dataclasses.is_dataclass(v) else v for k, v in kwargs.items()}


def renamed_options(argv: list[str], sections: Mapping[str, Mapping[str, str]]) -> list[str]:
    """"``section.old`` is now ``section.new``" for each old option name in ``argv``'s
    ``--section.old`` arguments and in the ``section:`` blocks of its ``--config`` files.
    ``sections``: section -> {old name: new dotted name}."""
    found = []
    for i, arg in enumerate(argv):
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        section, _, name = key.partition(".")
        if name in sections.get(section, {}):
            found.append(f"{section}.{name}")
        if key == "config" and i + 1 < len(argv) or arg.startswith("--config="):
            found += [f"{s}.{n}" for s, n in _config_keys(arg.split("=", 1)[1] if "=" in arg else argv[i + 1])
                      if n in sections.get(s, {})]
    return [f"{key} is now {key.split('.')[0]}.{sections[key.split('.')[0]][key.split('.', 1)[1]]}" for key in found]


def _config_keys(path: str) -> list[tuple[str, str]]:
    """(section, option) of a YAML config's sections; nothing for a file that is not one (the
    parser then says what is wrong with it)."""
    import yaml  # noqa: PLC0415 - only when a config is given

    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    if not isinstance(document, dict):
        return []
    keys = []
    for section, block in document.items():
        if isinstance(block, dict):
            block = block.get("init_args", block)
            keys += [(str(section), str(k)) for k in block] if isinstance(block, dict) else []
    return keys
