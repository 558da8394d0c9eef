"""``evaluate --ckpt_path X --data.path tst.json``: another file's products scored as seen
(in the checkpoint's training split) and unseen, both in the report."""

from __future__ import annotations

import json

import pytest

from amzft.cli.main import main
from amzft.evaluation.run import ratio_line
from amzft.inference.load import load_answerer
from helpers import copy_run, fit_args, tiny_records


def test_evaluate_on_another_file_reports_seen_and_unseen(trained_run, write_jsonl, tmp_path, capsys):
    ckpt = copy_run(trained_run, tmp_path)  # a fit on tiny_records(30) with test and validation splits; evaluate writes beside it
    loaded = load_answerer(ckpt)
    dm, step = loaded.datamodule(), loaded.step
    trained, held_out = list(dm.split("train")["title"]), list(dm.split("test")["title"])
    assert len(trained) >= 3 and len(held_out) >= 2
    # Trained products, one with other case and spacing (the same product to the split's key);
    # the checkpoint's held-out products and new ones are unseen.
    titles = [trained[0].upper(), trained[1].replace(" ", "   "), trained[2], *held_out[:2],
              *(f"Brand new thing {i}" for i in range(4))]
    records = [{"title": t, "content": f"A fresh description number {i} of a product for testing."}
               for i, t in enumerate(titles)]
    tst = write_jsonl(records, name="tst.json")

    capsys.readouterr()
    main(["evaluate", "--ckpt_path", str(ckpt), "--data.path", str(tst), "--samples", "10", "--gen.max_new_tokens", "2"])
    out = capsys.readouterr().out
    assert "3 products seen in training, 6 unseen" in out
    report = json.loads((ckpt.parent.parent / "eval_tst" / "report.json").read_text())
    assert report["file"] == {"path": str(tst), "seen": 3, "unseen": 6}
    assert {name: split["n"] for name, split in report["splits"].items()} == {"seen": 3, "unseen": 6}
    assert set(report["splits"]["seen"]["models"]) == {"base", "fine-tuned"}
    assert {e["title"] for e in report["splits"]["unseen"]["examples"]} >= {"Brand new thing 0", held_out[0]}
    assert not (ckpt.parent.parent / "report.json").exists()  # the run's own report is not overwritten
    assert report["step"] == step
    # Each split states its product count and the fine-tuned ÷ base ROUGE-L ratio with its paired-bootstrap
    # interval, in report.json, report.md and the printed table.
    md = (ckpt.parent.parent / "eval_tst" / "report.md").read_text()
    for split in report["splits"].values():
        ratio, per = split["ratio"], split["per_product"]
        assert split["n_products"] == ratio["n_products"] == ratio["n_rows"] == len(set(per["products"])) == split["n"]
        assert {k: ratio[k] for k in ("metric", "tuned", "base", "confidence", "resamples")} == {
            "metric": "rougeL", "tuned": "fine-tuned", "base": "base", "confidence": 0.95, "resamples": 2000}
        means = {m: sum(per["rougeL"][m]) / split["n"] for m in ("base", "fine-tuned")}
        for model, mean in means.items():  # the per-product scores are the table's rougeL, product by product
            assert mean == pytest.approx(split["models"][model]["rougeL"], abs=1e-6)
        if means["base"] > 0:
            assert ratio["value"] == pytest.approx(means["fine-tuned"] / means["base"]) and ratio["low"] <= ratio["value"]
        else:  # a 2-token answer of a random tiny model may share no word with the reference
            assert ratio["value"] is None and ratio["note"] == "the base's mean is 0"
        assert f"\n{ratio_line(ratio)}\n" in md and ratio_line(ratio) in out

    # The training file itself (or a config naming it) keeps the usual train / test report.
    main(["evaluate", "--ckpt_path", str(ckpt), "--data.path", dm.settings.path, "--samples", "2",
          "--gen.max_new_tokens", "2", "--splits", "[test]"])
    assert set(json.loads((ckpt.parent.parent / "report.json").read_text())["splits"]) == {"test"}


def test_evaluate_on_the_training_file_read_up_to_a_limit_scores_the_rest_as_unseen(tiny_model_dir, write_jsonl,
                                                                                      tmp_path, capsys):
    data = write_jsonl(tiny_records(30))
    main(fit_args(tiny_model_dir, data, tmp_path, "--trainer.max_steps", "1", "--data.limit", "12",
                  "--data.holdout.val_fraction", "0.2", "--data.holdout.test_fraction", "0.2"))
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    dm = load_answerer(ckpt).datamodule()
    trained = set(dm.split("train")["title"])
    assert 0 < len(trained) < 12
    capsys.readouterr()
    main(["evaluate", "--ckpt_path", str(ckpt), "--data.path", str(data), "--samples", "30", "--gen.max_new_tokens", "1"])
    assert f"{len(trained)} products seen in training, {30 - len(trained)} unseen" in capsys.readouterr().out
    report = json.loads((ckpt.parent.parent / "eval_trn" / "report.json").read_text())
    assert {e["title"] for e in report["splits"]["seen"]["examples"]} == trained
    unseen = {e["title"] for e in report["splits"]["unseen"]["examples"]}
    assert unseen.isdisjoint(trained) and {r["title"] for r in tiny_records(30)[12:]} <= unseen
