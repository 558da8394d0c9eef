"""One default decoding everywhere (amzft.model.decoding), the ``collapsed`` view, and the decoding
benchmark (tiny models, fast)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest
import torch
import yaml

from amzft.cli.main import main
from amzft.data.prompt import PromptFormat
from amzft.errors import ConfigError
from amzft.evaluation.scoring import collapsed_share, failure_views
from amzft.export.gguf import modelfile
from amzft.inference.load import load_answerer
from amzft.model import generation
from amzft.model.decoding import DEFAULT_DECODING, GREEDY, GenerationOptions, describe, resolve_decoding
from amzft.model.generation import Answer, generate_answers
from amzft.model.module import LoraCausalLM
from helpers import REPO, fit_args, one_line_error, tiny_records

SAME = "This comfortable cotton shirt is perfect for everyday wear and easy to wash."


def test_collapsed_share_on_crafted_answers():
    assert collapsed_share([SAME] * 3) == 1.0
    assert collapsed_share(["A red mug for coffee and tea.", "A steel lamp with a warm light.",
                            "A novel about a long summer."]) == 0.0
    shared = "one two three four five six seven eight"  # one 8-gram, in the 2nd and 4th answer
    answers = ["Alpha beta gamma delta epsilon.", f"First here: {shared} and more.",
               "Completely different words entirely here.", f"Then {shared}, later."]
    assert collapsed_share(answers) == 0.5
    # A 7-gram is not enough; short first sentences ("The.", "A great gift.") do not count.
    assert collapsed_share(["x one two three four five six seven y", "z one two three four five six seven w"]) == 0.0
    assert collapsed_share(["The. A mug for tea.", "The. A lamp for reading.", "A great gift. Blue.",
                            "A great gift. Red."]) == 0.0
    # Normalised first sentences (case, spacing) do; the rest of the answer may differ.
    assert collapsed_share(["This Is A Fine  Product. Red mug.", "this is a fine product. Steel lamp.", "Other."]) == 2 / 3
    # Answers of the same product may agree; empty answers and none at all are not collapsed.
    assert collapsed_share([SAME, SAME], ["p", "p"]) == 0.0
    assert collapsed_share(["", ""]) == 0.0 and collapsed_share([]) == 0.0


def test_failure_views_report_collapsed_by_product():
    views = failure_views([Answer(SAME, 9, True), Answer(SAME, 9, True), Answer("A lamp.", 3, True)],
                          ["Shirt", "Other shirt", "Lamp"], ["", "", ""])
    assert views["collapsed"] == pytest.approx(2 / 3)
    # The same product twice (its titles differing only in case and spacing) is not a collapse.
    assert failure_views([Answer(SAME, 9, True)] * 2, ["Shirt", " shirt"], ["", ""])["collapsed"] == 0.0


def test_decoding_presets_and_overrides():
    assert resolve_decoding() == DEFAULT_DECODING
    greedy = resolve_decoding("greedy")
    assert greedy == GREEDY == GenerationOptions() and (greedy.repetition_penalty, greedy.no_repeat_ngram_size) == (1.0, 0)
    assert resolve_decoding("greedy", 1.3, None) == replace(GREEDY, repetition_penalty=1.3)
    assert resolve_decoding("default", None, 0, max_new_tokens=7) == replace(DEFAULT_DECODING, no_repeat_ngram_size=0,
                                                                                max_new_tokens=7)
    assert describe(replace(DEFAULT_DECODING, max_new_tokens=9)).startswith("default (")
    assert describe(GREEDY).startswith("greedy (repetition_penalty 1, no_repeat_ngram_size 0")
    assert describe(replace(GREEDY, repetition_penalty=1.3)).startswith("custom (")
    for bad in ({"decoding": "beam"}, {"repetition_penalty": 0.0}, {"no_repeat_ngram_size": -1}):
        with pytest.raises(ConfigError):
            resolve_decoding(**bad)


@pytest.fixture
def record(monkeypatch):
    """Every command's answers come from amzft.model.generation.generate: record the options each call
    gets (under the label set in ``calls["now"]``) and answer without a model."""
    calls: dict = {"now": None}

    def fake(module, prompts, options=None, use_adapter=True, batch_size=8):
        calls.setdefault(calls["now"], []).append(options)
        return [Answer("a red cotton shirt.", 5, True) for _ in prompts]

    monkeypatch.setattr(generation, "generate", fake)
    return calls


def _demo_config(tiny_model_dir, data, tmp_path):
    """configs/cpu.yaml shrunk to the tiny model, validating (and scoring val/rougeL) every step."""
    cfg = yaml.safe_load((REPO / "configs" / "cpu.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tiny_model_dir)
    cfg["data"].update(path=str(data), cache_dir=str(tmp_path / "cache"), holdout={"val_fraction": 0.25, "test_fraction": 0.25})
    cfg["trainer"].update(max_steps=2, enable_progress_bar=False, enable_model_summary=False)
    cfg["validation"]["every_n_steps"] = 1
    cfg["sample_answers"] = {"every_n_steps": 0, "rouge_products": 2, "max_new_tokens": 3}
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_every_command_decodes_with_the_one_default(record, tiny_model_dir, write_jsonl, tmp_path, capsys):
    """ask, evaluate, fit's val/rougeL, predict, demo (and its val/rougeL) and export all use
    DEFAULT_DECODING (each with its own max_new_tokens)."""
    data = write_jsonl(tiny_records(24))
    logs = str(tmp_path / "logs")
    record["now"] = "ask"
    main(["ask", "Mug", "--model", json.dumps({"name_or_path": str(tiny_model_dir)}), "--max_new_tokens", "2"])
    record["now"] = "evaluate"
    main(["evaluate", "--model", json.dumps({"name_or_path": str(tiny_model_dir)}), "--data.path", str(data), "--data.cache_dir",
          str(tmp_path / "cache"), "--samples", "2", "--out", str(tmp_path / "eval"), "--gen.max_new_tokens", "2"])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["decoding"] == describe(replace(DEFAULT_DECODING, max_new_tokens=2))
    assert "collapsed" in report["splits"]["train"]["models"]["base"]
    assert "decoding: default (" in capsys.readouterr().out
    record["now"] = "val/rougeL"
    split = ("--data.holdout.val_fraction", "0.25", "--data.holdout.test_fraction", "0.25")
    main(fit_args(tiny_model_dir, data, tmp_path, "--trainer.max_steps", "1", *split, "--validation.every_n_steps", "1",
                  "--sample_answers.rouge_products", "2", "--sample_answers.every_n_steps", "0"))
    record["now"] = "predict"
    args = fit_args(tiny_model_dir, data, tmp_path, "--ckpt_path", "last", *split, "--model.max_new_tokens", "3")
    main(["predict", *args[1:]])
    record["now"] = "demo"
    main(["demo", "--config", str(_demo_config(tiny_model_dir, data, tmp_path)), "--log_root", str(tmp_path / "demo"),
          "--max_new_tokens", "2"])
    assert "answers (decoding: default (repetition_penalty" in capsys.readouterr().out
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "peft"), "--log_root", logs])
    assert set(record) == {"now", "ask", "evaluate", "val/rougeL", "predict", "demo"}
    used = {replace(options, max_new_tokens=DEFAULT_DECODING.max_new_tokens) for key, calls in record.items()
            if key != "now" for options in calls}
    assert used == {DEFAULT_DECODING}
    exported = json.loads((tmp_path / "peft" / "generation_config.json").read_text())
    assert exported["repetition_penalty"] == DEFAULT_DECODING.repetition_penalty
    assert exported["no_repeat_ngram_size"] == DEFAULT_DECODING.no_repeat_ngram_size


def test_decoding_greedy_and_overrides_reach_every_command(record, tiny_model_dir, write_jsonl, tmp_path, capsys):
    data = write_jsonl(tiny_records(24))
    record["now"] = "ask"
    main(["ask", "Mug", "--model", json.dumps({"name_or_path": str(tiny_model_dir)}), "--max_new_tokens", "2", "--decoding", "greedy"])
    assert record["ask"] == [replace(GREEDY, max_new_tokens=2)]
    record["now"] = "evaluate"
    main(["evaluate", "--model", json.dumps({"name_or_path": str(tiny_model_dir)}), "--data.path", str(data), "--data.cache_dir",
          str(tmp_path / "cache"), "--samples", "1", "--out", str(tmp_path / "eval"), "--decoding", "greedy",
          "--repetition_penalty", "1.3", "--gen.max_new_tokens", "2"])
    assert set(record["evaluate"]) == {replace(GREEDY, repetition_penalty=1.3, max_new_tokens=2)}
    assert "custom (repetition_penalty 1.3, no_repeat_ngram_size 0" in capsys.readouterr().out
    record["now"] = "predict"
    split = ("--data.holdout.val_fraction", "0.25", "--data.holdout.test_fraction", "0.25")
    main(fit_args(tiny_model_dir, data, tmp_path, "--trainer.max_steps", "1", *split, "--validation.every_n_steps", "1",
                  "--sample_answers.rouge_products", "2", "--sample_answers.max_new_tokens", "2",
                  "--decoding", "greedy", "--no_repeat_ngram_size", "3"))
    args = fit_args(tiny_model_dir, data, tmp_path, "--ckpt_path", "last", *split, "--model.max_new_tokens", "3")
    main(["predict", *args[1:], "--decoding", "greedy"])
    assert set(record["predict"]) == {replace(GREEDY, no_repeat_ngram_size=3, max_new_tokens=2),  # val/rougeL
                                      replace(GREEDY, max_new_tokens=3)}  # predict
    assert "--decoding takes default or greedy; found 'beam'" in one_line_error(capsys, "ask", "Mug", "--decoding", "beam")


@pytest.fixture(scope="module")
def trained(trained_run):
    """The session's short fit on tiny_records(30) with train / validation / test splits (conftest):
    its last.ckpt, read only."""
    return str(trained_run)


def test_exports_carry_the_decoding(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: PLC0415 - heavy

    ckpt = trained
    main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "peft")])
    main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "merged"), "--format", "merged"])
    assert "decoding: default (" in capsys.readouterr().out
    loaded = load_answerer(ckpt)
    module, _ = loaded.module, loaded.prompt
    for kind in ("peft", "merged"):
        config = GenerationConfig.from_pretrained(tmp_path / kind)
        assert config.repetition_penalty == DEFAULT_DECODING.repetition_penalty
        assert config.no_repeat_ngram_size == DEFAULT_DECODING.no_repeat_ngram_size
        assert config.do_sample is False and config.max_new_tokens == DEFAULT_DECODING.max_new_tokens
        assert (config.eos_token_id, config.pad_token_id) == (module.tokenizer.eos_token_id, module.tokenizer.pad_token_id)
        assert tuple(config.exponential_decay_length_penalty or ()) == (DEFAULT_DECODING.length_decay or ())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.generation_config.repetition_penalty == DEFAULT_DECODING.repetition_penalty
    main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "greedy"), "--decoding", "greedy"])
    greedy = json.loads((tmp_path / "greedy" / "generation_config.json").read_text())
    assert greedy["repetition_penalty"] == 1.0 and greedy["no_repeat_ngram_size"] == 0
    assert "exponential_decay_length_penalty" not in greedy


def test_the_modelfile_carries_the_repetition_penalty():
    text = modelfile("m.gguf", PromptFormat(), "</s>")
    assert f"PARAMETER repeat_penalty {DEFAULT_DECODING.repetition_penalty:g}\n" in text
    assert "PARAMETER repeat_last_n -1" in text and "no n-gram ban" in text  # said, not silently dropped
    greedy = modelfile("m.gguf", PromptFormat(), "</s>", GREEDY)
    assert "PARAMETER repeat_penalty 1\n" in greedy and "n-gram" not in greedy  # 1, not Ollama's default 1.1
    ending = modelfile("m.gguf", PromptFormat(), "</s>", replace(GREEDY, length_decay_start=96, length_decay_factor=1.1))
    assert "length_decay_start 96" in ending and "Ollama has no length decay" in ending


def test_the_default_decoding_runs_on_a_tiny_model(tiny_model_dir):
    module = LoraCausalLM(name_or_path=str(tiny_model_dir))
    module.configure_model()
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    titles = ["Mug", "A much longer product title with many words in it", "Lamp"]
    batched = generate_answers(module, titles, PromptFormat(), max_new_tokens=12)  # DEFAULT_DECODING
    single = [generate_answers(module, [t], PromptFormat(), max_new_tokens=12)[0] for t in titles]
    assert batched == single and all(batched)
    words = generate_answers(module, titles, PromptFormat(), max_new_tokens=12)
    assert words == batched  # no sampling: reproducible


def test_the_length_decay_ends_answers_before_the_cap(tiny_model_dir):
    module = LoraCausalLM(name_or_path=str(tiny_model_dir))
    module.configure_model()
    prompts = [PromptFormat().render(t) for t in ("Mug", "A much longer product title with many words in it", "Lamp")]
    plain = generation.generate(module, prompts, replace(GREEDY, max_new_tokens=16))
    assert not any(a.stopped for a in plain)  # a random tiny model never picks its EOS on its own
    ending = replace(GREEDY, max_new_tokens=16, length_decay_start=3, length_decay_factor=1000.0)
    ended = generation.generate(module, prompts, ending)
    assert all(a.stopped and a.new_tokens <= 5 for a in ended)
    # Before the start the answers are the plain ones: only the end-of-answer token is pushed.
    for a, b in zip(plain, ended, strict=True):
        assert a.text.startswith(b.text)
    assert ending.generate_kwargs()["exponential_decay_length_penalty"] == (3, 1000.0)
    assert "exponential_decay_length_penalty" not in GREEDY.generate_kwargs()
    for bad in ({"length_decay_start": -1}, {"length_decay_factor": 0.9}):
        with pytest.raises(ConfigError, match="length_decay"):
            resolve_decoding(**bad)


@pytest.mark.e2e
def test_the_decoding_benchmark_runs(trained, tmp_path, capsys, monkeypatch):
    ckpt = trained
    # Run as a script, a benchmark finds its sibling benchmarks/machine.py on sys.path[0]; loaded by path, it does not.
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("decoding_benchmark", REPO / "benchmarks" / "decoding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    default = bench.grid_entry(DEFAULT_DECODING)
    assert bench.parse_grid(default) == [(DEFAULT_DECODING.repetition_penalty, DEFAULT_DECODING.no_repeat_ngram_size,
                                          DEFAULT_DECODING.length_decay_start, DEFAULT_DECODING.length_decay_factor)]
    rows = bench.main(["--ckpt_path", ckpt, "--samples", "2", "--grid", f"1.0:0,{default}", "--max_new_tokens", "3",
                       "--out", str(tmp_path / "rows.json")])
    out = capsys.readouterr().out
    assert [(r["setting"], r["split"], r["model"]) for r in rows] == [
        ("1:0", "train", "fine-tuned"), ("1:0", "test", "fine-tuned"),
        (f"{default} (default)", "train", "fine-tuned"), (f"{default} (default)", "test", "fine-tuned")]
    assert bench.parse_grid("1.15:4:96:1.1") == [(1.15, 4, 96, 1.1)]
    assert all({"rougeL", "looping", "never_stopped", "collapsed", "facts_invented"} <= set(r) for r in rows)
    assert "machine: " in out and "date: " in out and "collapsed" in out
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    # Another file: its products as seen / unseen by the checkpoint.
    other = tmp_path / "other.json"
    other.write_text("\n".join(json.dumps(r) for r in tiny_records(30) + tiny_records(40)[30:]) + "\n")
    rows = bench.main(["--ckpt_path", ckpt, "--data", str(other), "--samples", "2", "--grid", "1.2:3",
                       "--max_new_tokens", "2", "--base"])
    assert {(r["split"], r["model"]) for r in rows} == {(s, m) for s in ("seen", "unseen") for m in ("base", "fine-tuned")}
    with pytest.raises(SystemExit):
        bench.main(["--ckpt_path", ckpt, "--grid", "1.2-3"])
    with pytest.raises(SystemExit):
        bench.main(["--ckpt_path", ckpt, "--grid", "1.2:3:96"])
