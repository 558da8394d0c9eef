"""Settings as types: every shape a section arrives in gives the same constructor arguments, each
group checks its own values, and no constructor grows a long parameter list again."""

from __future__ import annotations

import ast

from jsonargparse import Namespace

from amzft.data.settings import BatchOptions, HoldoutOptions
from amzft.model.settings import GROUPS as MODEL_GROUPS
from amzft.model.settings import ComputeOptions, LoraOptions, OptimOptions
from amzft.settings import hyperparameters, init_kwargs, with_overrides
from helpers import REPO

MAX_PARAMETERS = 13  # a constructor's, self excluded; more means a group is missing


class _Model:
    """Stands in for LoraCausalLM (the same class attributes and parameters, no torch)."""

    GROUPS = MODEL_GROUPS

    def __init__(self, name_or_path="embedded", lora=LoraOptions(), optim=OptimOptions(), compute=ComputeOptions()):
        pass


def test_a_section_in_any_shape_gives_the_same_arguments():
    want = {"name_or_path": "m", "lora": LoraOptions(r=8, seed=1), "optim": OptimOptions(lr=1e-3)}
    grouped = {"name_or_path": "m", "lora": {"r": 8, "seed": 1}, "optim": {"lr": 1e-3}, "_instantiator": "x", "other_tool": 1}
    parsed = Namespace(name_or_path="m", lora=Namespace(r=8, seed=1), optim=Namespace(lr=1e-3))
    saved = hyperparameters(want)
    assert saved["lora"]["r"] == 8 and isinstance(saved["optim"], dict)
    for shape in (grouped, parsed, saved):
        assert init_kwargs(_Model, shape) == want, shape
    # an override of a group replaces only the options it names
    assert with_overrides(_Model, saved, {"optim": {"warmup_steps": 0}})["optim"] == OptimOptions(lr=1e-3, warmup_steps=0)


def test_each_group_checks_its_own_values():
    assert LoraOptions(r=0).problems() and LoraOptions(dropout=1.0).problems() and not LoraOptions().problems()
    assert OptimOptions(lr=float("nan")).problems() and OptimOptions(warmup_steps=-1).problems()
    assert ComputeOptions(compile=True).problems("unsloth") and not ComputeOptions(compile=True).problems("hf")
    assert HoldoutOptions(val_fraction=0.6, test_fraction=0.5).problems()
    assert BatchOptions(share_prefix=True).problems() and not BatchOptions(layout="packed", share_prefix=True).problems()


def test_no_constructor_takes_more_than_a_dozen_parameters():
    """The lesson of the flat layout (28 arguments to the data module): group options instead."""
    long = []
    for path in sorted((REPO / "src" / "amzft").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "__init__":
                count = len(node.args.args) - 1 + len(node.args.kwonlyargs)
                if count > MAX_PARAMETERS:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} ({count} parameters)")
    assert not long, long
