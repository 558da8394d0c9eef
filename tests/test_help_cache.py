"""`fit --help` is rendered by LightningCLI once, then read back without importing torch
(amzft.cli.help_cache); anything the text depends on renders it again."""

import os
import subprocess
import sys

import pytest

import amzft.cli.lightning_cli as lightning_cli
from amzft.cli import help_cache
from amzft.cli.main import main
from helpers import REPO

HEAVY = ("torch", "transformers", "lightning", "peft", "datasets")


@pytest.fixture
def help_env(tmp_path, monkeypatch):
    monkeypatch.setenv("AMZFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "100")  # the key holds the width the text was wrapped to
    return {"AMZFT_CACHE": str(tmp_path / "cache"), "COLUMNS": "100"}


def _refuse_to_render(*args, **kwargs):
    raise AssertionError("the kept help should have been printed, not rendered again")


def test_fit_help_is_rendered_once_then_read_back_without_torch(help_env, capsys, monkeypatch):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])
    assert done.value.code in (0, None)
    rendered = capsys.readouterr().out
    assert "--model.lora.r" in rendered and "--trainer.max_steps" in rendered and "--data.batches.layout" in rendered

    monkeypatch.setattr(lightning_cli, "cli_main", _refuse_to_render)
    main(["fit", "--help"])
    assert capsys.readouterr().out == rendered

    # A fresh interpreter prints the same text and imports none of the heavy libraries.
    code = ("import sys; from amzft.cli.main import main; main(['fit', '--help']); "
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    env = {**os.environ, **help_env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=REPO).stdout
    assert out == rendered + "HEAVY []\n"


def test_what_the_help_depends_on_is_in_its_key(help_env, tmp_path, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  max_steps: 7\n")
    args = ["--config", str(config), "--help"]
    key = help_cache.help_key("fit", args)
    assert help_cache.help_key("fit", args) == key
    assert help_cache.help_key("validate", args) != key
    config.write_text("trainer:\n  max_steps: 8\n")  # the help shows a config's values as defaults
    assert help_cache.help_key("fit", args) != key
    edited = help_cache.help_key("fit", args)
    monkeypatch.setenv("COLUMNS", "60")
    assert help_cache.help_key("fit", args) != edited
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(help_cache, "_library_versions", lambda: {"lightning": "9.9"})
    assert help_cache.help_key("fit", args) != edited


def test_a_failed_render_is_not_kept(help_env, tmp_path):
    args = ["--config", str(tmp_path / "missing.yaml"), "--help"]
    with pytest.raises(SystemExit) as done:
        main(["fit", *args])
    assert done.value.code not in (0, None)
    assert help_cache.cached_help("fit", args) is None


def test_only_the_newest_texts_are_kept(help_env, tmp_path, monkeypatch):
    monkeypatch.setattr(help_cache, "KEEP", 3)

    def render():
        print("usage: …")
        raise SystemExit(0)

    for i in range(5):
        with pytest.raises(SystemExit):
            help_cache.render_and_keep("fit", [f"--trainer.max_steps={i}", "--help"], render)
    kept = list((tmp_path / "cache" / "help").glob("*.txt"))
    assert len(kept) == 3
    assert help_cache.cached_help("fit", ["--trainer.max_steps=4", "--help"]) == "usage: …\n"
