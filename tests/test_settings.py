"""Settings as types: every shape a section arrives in gives the same constructor arguments, an
option of the flat layout is a one-line error naming its new place, and no constructor grows a
long parameter list again."""

from __future__ import annotations

import ast
import dataclasses

import pytest
import yaml
from jsonargparse import Namespace

from amzft.data.settings import GROUPS as DATA_GROUPS
from amzft.data.settings import RENAMED as DATA_RENAMED
from amzft.data.settings import BatchOptions, HoldoutOptions
from amzft.model.settings import GROUPS as MODEL_GROUPS
from amzft.model.settings import RENAMED as MODEL_RENAMED
from amzft.model.settings import ComputeOptions, LoraOptions, OptimOptions
from amzft.settings import hyperparameters, init_kwargs, nested
from helpers import REPO, one_line_error

MAX_PARAMETERS = 13  # a constructor's, self excluded; more means a group is missing


class _Model:
    """Stands in for LoraCausalLM (the same class attributes and parameters, no torch)."""

    RENAMED, GROUPS = MODEL_RENAMED, MODEL_GROUPS

    def __init__(self, name_or_path="embedded", lora=LoraOptions(), optim=OptimOptions(), compute=ComputeOptions()):
        pass


@pytest.mark.parametrize("renamed, groups", [(MODEL_RENAMED, MODEL_GROUPS), (DATA_RENAMED, DATA_GROUPS)])
def test_every_renamed_option_names_a_field_of_its_group(renamed, groups):
    for old, new in renamed.items():
        group, name = new.split(".")
        assert name in {f.name for f in dataclasses.fields(groups[group])}, (old, new)


def test_a_section_in_any_shape_gives_the_same_arguments():
    want = {"name_or_path": "m", "lora": LoraOptions(r=8, seed=1), "optim": OptimOptions(lr=1e-3)}
    flat = {"name_or_path": "m", "lora_r": 8, "lora_seed": 1, "lr": 1e-3, "_instantiator": "x", "other_tool": 1}
    grouped = {"name_or_path": "m", "lora": {"r": 8, "seed": 1}, "optim": {"lr": 1e-3}}
    parsed = Namespace(name_or_path="m", lora=Namespace(r=8, seed=1), optim=Namespace(lr=1e-3))
    saved = hyperparameters(want)
    assert saved["lora"]["r"] == 8 and isinstance(saved["optim"], dict)
    for shape in (flat, grouped, parsed, saved):
        assert init_kwargs(_Model, shape) == want, shape
    # a group given both ways: the grouped value wins over the old flat one
    assert nested({"lr": 1.0, "optim": {"lr": 2.0}}, MODEL_RENAMED, MODEL_GROUPS) == {"optim": {"lr": 2.0}}


def test_each_group_checks_its_own_values():
    assert LoraOptions(r=0).problems() and LoraOptions(dropout=1.0).problems() and not LoraOptions().problems()
    assert OptimOptions(lr=float("nan")).problems() and OptimOptions(warmup_steps=-1).problems()
    assert ComputeOptions(compile=True).problems("unsloth") and not ComputeOptions(compile=True).problems("hf")
    assert HoldoutOptions(val_fraction=0.6, test_fraction=0.5).problems()
    assert BatchOptions(share_prefix=True).problems() and not BatchOptions(layout="packed", share_prefix=True).problems()


def test_an_old_option_on_the_command_line_names_its_new_place(capsys):
    err = one_line_error(capsys, "fit", "--model.lr", "1e-3", "--data.layout=packed", code=2)
    assert "model.lr is now model.optim.lr" in err and "data.layout is now data.batches.layout" in err


def test_an_old_option_in_a_config_file_names_its_new_place(capsys, tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text(yaml.safe_dump({"model": {"lora_r": 8}, "data": {"val_fraction": 0.1, "path": None}}))
    err = one_line_error(capsys, "evaluate", "--config", str(config), code=2)
    assert "model.lora_r is now model.lora.r" in err and "data.val_fraction is now data.holdout.val_fraction" in err


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
