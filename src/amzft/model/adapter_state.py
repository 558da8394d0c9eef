"""Adapter-only checkpoints (the frozen base is rebuilt from ``model.name_or_path``), checked on
load so that another base's or LoRA config's checkpoint is a one-line error."""

from __future__ import annotations

import torch

from amzft.errors import ModelError

SKIPPED_STEPS_KEY = "amzft_skipped_steps"  # optimizer steps skipped for a non-finite loss


class AdapterCheckpointing:
    """Mixed into the LightningModule (before ``LightningModule``)."""

    def trainable_keys(self) -> dict[str, torch.Size]:
        return {f"model.{n}": p.shape for n, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.model is None:
            return full
        keep = {prefix + k for k in self.trainable_keys()}
        return type(full)((k, v) for k, v in full.items() if k in keep)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[SKIPPED_STEPS_KEY] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_adapter_state(checkpoint.get("state_dict", {}))
        self.skipped_steps = int(checkpoint.get(SKIPPED_STEPS_KEY, 0))

    def check_adapter_state(self, state: dict) -> None:
        """Exactly this model's adapter, or a clear error (loading is not strict: the base is not in the file)."""
        expected = self.trainable_keys()
        missing = [k for k in expected if k not in state]
        wrong = [k for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape)]
        if missing or wrong:
            what = f"{len(missing)} adapter tensors missing" if missing else f"shape mismatch in {wrong[0]}"
            raise ModelError(f"the checkpoint does not fit this model ({what}): it was made with another base model "
                             f"or LoRA config than name_or_path={self.hparams.name_or_path!r}, lora.r={self.lora.r}")
