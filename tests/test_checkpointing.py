
import pytest
import torch

from amzft.checkpoints.io import atomic_torch_save, load_checkpoint_file
from amzft.errors import ModelError


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
