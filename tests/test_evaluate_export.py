import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from amzft.cli.main import main
from amzft.evaluation.scoring import failure_views, is_looping, is_title_only, overlap_scores
from amzft.inference.load import load_answerer
from amzft.model.generation import Answer
from helpers import copy_run, exports_give_the_logits, fit_args


def test_overlap_scores_are_torchmetrics_values():
    s = overlap_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert s["rouge1"] == pytest.approx(1) and s["rougeL"] == pytest.approx(1) and s["bleu"] == pytest.approx(1)
    low = overlap_scores(["completely unrelated words"], ["the cat sat on the mat"])
    assert low["rouge1"] == 0 and low["bleu"] == 0 and low["chrf"] < 0.2


def test_failure_views():
    assert is_looping("She is a mother to a young boy. She is a mother to a young boy.")
    assert is_looping("great value for money, great value for money, great value for money")
    assert not is_looping("A warm coat. A light scarf. Good for winter.")
    assert is_title_only("Girls Ballet Tutu.", "Girls Ballet Tutu Neon Pink")
    assert not is_title_only("A tutu for dance class.", "Girls Ballet Tutu Neon Pink")
    views = failure_views(
        [Answer("Written by Jane Austen in 1813.", 9, True), Answer("", 1, True), Answer("x y z", 5, False)],
        ["Pride", "Mug", "Lamp"],
        ["Jane Austen wrote it in 1811.", "A mug.", "A lamp."],
    )
    assert views["empty"] == pytest.approx(1 / 3) and views["never_stopped"] == pytest.approx(1 / 3)
    assert views["facts_recalled"] == pytest.approx(1 / 2)  # Jane Austen yes, 1811 no
    assert views["facts_invented"] == pytest.approx(1 / 2)  # 1813 invented


@pytest.fixture
def trained(trained_run, tmp_path):
    """A copy of the session's trained run (2 steps, validation and test splits of 0.2): these
    tests write reports beside its checkpoint, or change it."""
    return copy_run(trained_run, tmp_path)


def test_evaluate_writes_reports_for_both_models_and_splits(trained, capsys):
    main(["evaluate", "--ckpt_path", str(trained), "--samples", "3", "--gen.max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert "rougeL" in out and "fine-tuned" in out
    run_dir = trained.parent.parent
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["splits"]) == {"train", "test"}
    for split in report["splits"].values():
        assert set(split["models"]) == {"base", "fine-tuned"} and split["n"] == 3
        assert {"rouge1", "rouge2", "rougeL", "bleu", "chrf", "looping", "never_stopped"} <= set(split["models"]["base"])
        assert len(split["examples"]) == 3
    assert "| rougeL |" in (run_dir / "report.md").read_text()
    train_titles = {e["title"] for e in report["splits"]["train"]["examples"]}
    test_titles = {e["title"] for e in report["splits"]["test"]["examples"]}
    assert not train_titles & test_titles


def test_exported_adapter_and_merged_model_match_the_module(trained, tmp_path):
    loaded = load_answerer(trained)
    module, _ = loaded.module, loaded.prompt
    with torch.no_grad():  # make the adapter non-trivial so that a wrong export shows
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    ids = torch.tensor([[128000, 791, 8415, 7731, 389, 279, 5634]])
    expected = module.model(input_ids=ids).logits
    adapter = {f"model.{k}": v for k, v in module.model.named_parameters() if v.requires_grad}
    torch.save({**torch.load(trained, weights_only=True), "state_dict": adapter}, trained)

    exports_give_the_logits(trained, ids, expected, tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter" / "amzft_prompt.json").read_text())["question"].startswith("What is")


def test_export_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--out", str(tmp_path / "x")])
    assert "a base-only run has no adapter to export" in capsys.readouterr().err


def test_sample_answers_reach_tensorboard(tiny_model_dir, tiny_data, tmp_path):
    main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "2", "--data.holdout.val_fraction", "0.2",
                  "--sample_answers.every_n_steps", "1", "--sample_answers.max_new_tokens", "3"))
    acc = EventAccumulator(str(tmp_path / "logs" / "amzft" / "version_0"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "samples/answers/text_summary" in acc.Tags()["tensors"]
    assert [e.step for e in acc.Tensors("samples/answers/text_summary")] == [1, 2]
