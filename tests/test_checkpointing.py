import json
import math

import pytest
import torch

from amzft.checkpoints.io import atomic_torch_save, load_checkpoint_file
from amzft.checkpoints.restore import datamodule_from_checkpoint
from amzft.cli.lightning_cli import cli_main
from amzft.data.clean import FilterSettings
from amzft.data.prompt import PromptFormat
from amzft.errors import ModelError
from amzft.model.module import LoraCausalLM
from helpers import REPO, fit_args


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    good = {"state_dict": {"w": torch.ones(3)}, "hyper_parameters": {"lr": 1.0}}
    atomic_torch_save(good, path)
    real_save = torch.save

    def crash_mid_write(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(ModelError, match="cannot write checkpoint .*last.ckpt: No space left on device; the previous last.ckpt is intact"):
        atomic_torch_save({"state_dict": {"w": torch.zeros(3)}, "hyper_parameters": {}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint_file(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


OLD_CHECKPOINT = REPO / "tests" / "data" / "checkpoint-0.1.0-step2.ckpt"


def test_a_checkpoint_written_by_amzft_0_1_0_still_loads_answers_and_resumes(tiny_model_dir, tiny_data, tmp_path):
    """tests/data holds a checkpoint that amzft 0.1.0 wrote (the tiny Llama of conftest, step 2
    of fit_args' recipe on tiny_records(30)) and the adapter's logits it gave then."""
    reference = json.loads(OLD_CHECKPOINT.with_suffix(".logits.json").read_text())
    module, fmt = LoraCausalLM.from_checkpoint(OLD_CHECKPOINT, name_or_path=str(tiny_model_dir))
    assert fmt == PromptFormat()
    with torch.no_grad():
        logits = module.model(input_ids=torch.tensor(reference["input_ids"])).logits[0].float()
    assert torch.allclose(logits[:, :16], torch.tensor(reference["logits_first16"]), atol=1e-5)
    assert torch.allclose(torch.logsumexp(logits, -1), torch.tensor(reference["logsumexp"]), atol=1e-5)
    # its flat hyper-parameters (lora_r, layout, val_fraction, …) are read into today's groups
    assert (module.lora.r, module.optim.lr, module.compute.quantization) == (16, 1e-3, "none")
    datamodule, step = datamodule_from_checkpoint(OLD_CHECKPOINT)
    assert step == 2 and datamodule.batches.layout == "plain" and datamodule.holdout.val_fraction == 0.0
    assert datamodule.settings.filters == FilterSettings() and datamodule.settings.prompt == PromptFormat()

    # and training resumes from it (optimizer, schedule, loops and sampler state) to step 3
    cli = cli_main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "3",
                            "--ckpt_path", str(OLD_CHECKPOINT)), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.ckpt_path)
    assert cli.trainer.global_step == 3
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
