"""``evaluate --predictions FILE``: answers already written (``describe``'s JSON Lines, or
``predict``'s predictions.jsonl) scored with ``evaluate``'s metrics and failure views, without
loading a model."""

from __future__ import annotations

import gzip
import json
import sys

import pytest

from amzft.cli.main import main
from amzft.evaluation.run import score_predictions_file
from amzft.evaluation.scoring import overlap_scores
from helpers import one_line_error

TUTU = "A tutu in neon pink tulle for ballet class and dress-up, sized for girls aged 2 to 8."
MUG = "A white ceramic mug that holds 12 ounces, safe in the dishwasher and the microwave."


def described(title, description, reference=None, stop="eos", new_tokens=20, **extra):
    """A row as ``describe`` writes it: ``reference`` only when the input had content."""
    row = {"title": title, "description": description, "new_tokens": new_tokens, "stop": stop, "line": 1, **extra}
    return row | ({"reference": reference} if reference is not None else {})


def report_of(path):
    return json.loads((path.parent / f"{path.name.split('.')[0]}_eval" / "report.json").read_text())


def test_identical_answers_score_one_and_the_report_is_shaped_like_evaluate(write_jsonl, capsys):
    path = write_jsonl([described("Girls Ballet Tutu", TUTU, TUTU, uid="B01"), described("Coffee Mug", MUG, MUG)],
                       name="describe.jsonl")
    main(["evaluate", "--predictions", str(path)])
    out = capsys.readouterr().out
    report = report_of(path)  # the default folder: describe_eval beside the file
    assert report["checkpoint"] is None and report["decoding"] == f"as written in {path}"
    assert list(report["splits"]) == ["predictions"]
    split = report["splits"]["predictions"]
    assert split["n"] == 2 and list(split["models"]) == ["describe"]  # the model is named after the file
    scores = split["models"]["describe"]
    for key in ("rouge1", "rouge2", "rougeL", "bleu"):
        assert scores[key] == pytest.approx(1.0), key
    assert scores["never_stopped"] == 0 and scores["empty"] == 0 and scores["mean_new_tokens"] == 20
    assert split["examples"][0] == {"title": "Girls Ballet Tutu", "reference": TUTU, "describe": TUTU, "predictions_line": 1}
    assert "describe" in out and "rougeL" in out and "scored 2 of 2 rows with a reference" in out
    md = (path.parent / "describe_eval" / "report.md").read_text()
    assert "| rougeL | 1.000 |" in md and "as written in" in md
    # Per-product scores and the product count; one model: no ratio to state.
    assert split["per_product"] == {"products": ["girls ballet tutu", "coffee mug"], "rougeL": {"describe": [1.0, 1.0]}}
    assert split["n_products"] == 2 and split["ratio"] is None and "÷" not in md and "÷" not in out
    assert any(f.name.startswith("events.out.tfevents") for f in (path.parent / "describe_eval").iterdir())


def test_a_mismatched_answer_lowers_the_score_as_overlap_scores_computes_it(write_jsonl, tmp_path):
    wrong = "A stainless steel kettle with a whistle."
    path = write_jsonl([described("Girls Ballet Tutu", TUTU, TUTU), described("Coffee Mug", wrong, MUG)])
    report, stats = score_predictions_file(path)
    scores = report["splits"]["predictions"]["models"]["trn"]
    expected = overlap_scores([TUTU, wrong], [TUTU, MUG])
    per_product = report["splits"]["predictions"]["per_product"]["rougeL"]["trn"]
    assert per_product[0] == pytest.approx(1.0) and sum(per_product) / 2 == pytest.approx(expected["rougeL"])
    assert scores["rougeL"] < 1.0
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key
    assert stats.kept == 2 and not stats.skipped
    # --out is honoured; the report written is the one returned.
    main(["evaluate", "--predictions", str(path), "--out", str(tmp_path / "elsewhere")])
    assert json.loads((tmp_path / "elsewhere" / "report.json").read_text())["splits"] == report["splits"]


def test_stop_length_counts_as_never_stopped(write_jsonl):
    path = write_jsonl([described("Girls Ballet Tutu", TUTU, TUTU, stop="length", new_tokens=128),
                        described("Coffee Mug", MUG, MUG, stop="eos", new_tokens=30),
                        described("Desk Lamp", "A lamp.", "A desk lamp.", stop="eos", new_tokens=4),
                        described("Book", "A novel.", "A novel about a war.", stop="length", new_tokens=128)])
    scores = score_predictions_file(path)[0]["splits"]["predictions"]["models"]["trn"]
    assert scores["never_stopped"] == pytest.approx(0.5)
    assert scores["mean_new_tokens"] == pytest.approx((128 + 30 + 4 + 128) / 4)


def test_bad_lines_are_counted_by_reason_with_their_line_numbers(write_jsonl, capsys):
    path = write_jsonl([
        described("Girls Ballet Tutu", TUTU, TUTU),             # 1
        "{not json",                                            # 2 malformed_json
        {"description": "no title", "reference": MUG},         # 3 missing_field
        {"title": "No answer", "reference": MUG},              # 4 missing_field
        described("Coffee Mug", 42, MUG),                       # 5 wrong_type
        described("Coffee Mug", MUG, MUG, new_tokens="many"),   # 6 wrong_type
        described("Coffee Mug", MUG, MUG, stop="tired"),        # 7 unknown_stop
        "[1, 2]",                                               # 8 not_an_object
        "",                                                     # 9 blank: not a record
        described("Coffee Mug", MUG, MUG),                      # 10
    ], name="preds.jsonl")
    report, stats = score_predictions_file(path)
    assert stats.records_read == 9 and stats.kept == 2
    assert dict(stats.skipped) == {"malformed_json": 1, "missing_field": 2, "wrong_type": 2, "unknown_stop": 1, "not_an_object": 1}
    assert stats.skipped_lines == {"malformed_json": [2], "missing_field": [3, 4], "wrong_type": [5, 6],
                                   "unknown_stop": [7], "not_an_object": [8]}
    assert report["predictions"]["skipped_lines"] == stats.skipped_lines
    assert report["splits"]["predictions"]["n"] == 2
    main(["evaluate", "--predictions", str(path)])
    out = capsys.readouterr().out
    assert "7 bad lines skipped" in out and "missing_field 2 (lines 3, 4)" in out and "malformed_json 1 (line 2)" in out
    assert "missing_field 2 (lines 3, 4)" in (path.parent / "preds_eval" / "report.md").read_text()


def test_rows_without_a_reference_are_not_scored_and_the_report_says_how_many(write_jsonl, capsys):
    path = write_jsonl([described("Girls Ballet Tutu", TUTU, TUTU), described("No content", "Something."),
                        described("Empty content", "Something else.", ""), described("Coffee Mug", MUG, MUG),
                        described("Null content", "More.", None) | {"reference": None}])
    report, _ = score_predictions_file(path)
    assert report["splits"]["predictions"]["n"] == 2
    assert [e["title"] for e in report["splits"]["predictions"]["examples"]] == ["Girls Ballet Tutu", "Coffee Mug"]
    assert report["splits"]["predictions"]["per_product"]["products"] == ["girls ballet tutu", "coffee mug"]
    assert {k: report["predictions"][k] for k in ("rows", "with_reference", "scored")} == {"rows": 5, "with_reference": 2, "scored": 2}
    main(["evaluate", "--predictions", str(path)])
    assert "scored 2 of 2 rows with a reference; 3 of its 5 rows have none" in capsys.readouterr().out


def test_samples_picks_a_seeded_sample_in_file_order(write_jsonl, capsys):
    rows = [described(f"Product {i}", f"Answer {i} words here.", f"Answer {i} words here.") for i in range(40)]
    path = write_jsonl(rows)
    first, _ = score_predictions_file(path, samples=5, seed=1)
    again, _ = score_predictions_file(path, samples=5, seed=1)
    other, _ = score_predictions_file(path, samples=5, seed=2)
    titles = [e["title"] for e in first["splits"]["predictions"]["examples"]]
    assert len(titles) == 5 and titles == [e["title"] for e in again["splits"]["predictions"]["examples"]]
    assert titles == sorted(titles, key=lambda t: int(t.split()[1]))  # file order
    assert titles != [e["title"] for e in other["splits"]["predictions"]["examples"]]
    assert {k: first["predictions"][k] for k in ("with_reference", "scored")} == {"with_reference": 40, "scored": 5}
    main(["evaluate", "--predictions", str(path), "--samples", "5", "--seed", "1"])
    assert "scored 5 of 40 rows with a reference (a seeded sample)" in capsys.readouterr().out


def test_an_old_style_predict_file_is_scored(write_jsonl, capsys):
    # callbacks.PredictionsWriter's rows: answer / stopped, no new_tokens.
    path = write_jsonl([{"title": "Girls Ballet Tutu", "reference": TUTU, "answer": TUTU, "stopped": True},
                        {"title": "Coffee Mug", "reference": MUG, "answer": "A mug mug mug", "stopped": False}],
                       name="predictions.jsonl")
    main(["evaluate", "--predictions", str(path)])
    out = capsys.readouterr().out
    scores = report_of(path)["splits"]["predictions"]["models"]["predictions"]
    assert scores["never_stopped"] == pytest.approx(0.5)
    assert scores["rougeL"] == pytest.approx(overlap_scores([TUTU, "A mug mug mug"], [TUTU, MUG])["rougeL"])
    assert "mean_new_tokens" not in scores  # unknown, not 0
    assert "| mean_new_tokens | n/a |" in (path.parent / "predictions_eval" / "report.md").read_text()
    assert "2 do not give new_tokens" in out


def test_a_gzip_file_is_read(tmp_path):
    path = tmp_path / "describe.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(described("Girls Ballet Tutu", TUTU, TUTU)) + "\n")
    report, _ = score_predictions_file(path)
    assert report["splits"]["predictions"]["models"]["describe"]["rougeL"] == pytest.approx(1.0)


def test_no_model_is_loaded(write_jsonl, monkeypatch, capsys):
    # A None entry in sys.modules makes importing that module fail: the path must not need them.
    for name in ("amzft.model.generation", "amzft.model.module", "amzft.checkpoints", "amzft.model.backends", "peft"):
        monkeypatch.setitem(sys.modules, name, None)
    path = write_jsonl([described("Girls Ballet Tutu", TUTU, TUTU)])
    main(["evaluate", "--predictions", str(path)])
    assert "rougeL" in capsys.readouterr().out


def test_errors_are_one_line(write_jsonl, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert f"{missing}: no such file" in one_line_error(capsys, "evaluate", "--predictions", str(missing), code=2)

    empty = write_jsonl([], name="empty.jsonl")
    assert f"{empty}: file is empty" in one_line_error(capsys, "evaluate", "--predictions", str(empty), code=2)

    unscorable = write_jsonl(["{oops", {"title": "t"}], name="bad.jsonl")
    line = one_line_error(capsys, "evaluate", "--predictions", str(unscorable), code=2)
    assert f"{unscorable}: no prediction rows" in line and "malformed_json 1 (line 1)" in line

    no_reference = write_jsonl([described("Girls Ballet Tutu", TUTU), described("Coffee Mug", MUG)], name="noref.jsonl")
    line = one_line_error(capsys, "evaluate", "--predictions", str(no_reference), code=2)
    assert str(no_reference) in line and "no `content` to score against" in line

    scorable = write_jsonl([described("Girls Ballet Tutu", TUTU, TUTU)], name="ok.jsonl")
    line = one_line_error(capsys, "evaluate", "--predictions", str(scorable), "--ckpt_path", "last", code=2)
    assert "--predictions" in line and "--ckpt_path" in line
    assert "--samples must be at least 1" in one_line_error(capsys, "evaluate", "--predictions", str(scorable),
                                                            "--samples", "0", code=2)
    assert not (tmp_path / "ok_eval").exists()


def test_rows_of_one_product_count_once_as_products(write_jsonl):
    # The same product to the product split's key (case and spacing aside): two answers, one product.
    path = write_jsonl([described("Coffee Mug", MUG, MUG), described("coffee  MUG", "A cup.", MUG),
                        described("Girls Ballet Tutu", TUTU, TUTU)], name="twice.jsonl")
    main(["evaluate", "--predictions", str(path)])
    split = report_of(path)["splits"]["predictions"]
    assert split["n"] == 3 and split["n_products"] == 2
    assert split["per_product"]["products"] == ["coffee mug", "coffee mug", "girls ballet tutu"]
    assert "(3 answers, 2 products)" in (path.parent / "twice_eval" / "report.md").read_text()
