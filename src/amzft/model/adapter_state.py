"""Adapter-only checkpoints: a checkpoint holds the trainable (LoRA) parameters and the training
state, never the frozen base, which is rebuilt from ``model.name_or_path``. Loading checks that
every adapter tensor is there with the right shape, so a checkpoint of another base or LoRA
config is a one-line error, not a silently half-loaded model. A whole module is rebuilt from a
checkpoint file by ``amzft.inference.load``."""

from __future__ import annotations

import torch

from amzft.errors import ModelError

SKIPPED_STEPS_KEY = "amzft_skipped_steps"  # optimizer steps skipped for a non-finite loss


class AdapterCheckpointing:
    """Mixed into the LightningModule (before ``LightningModule``): its checkpoints hold the
    adapter only and are validated against the base on load."""

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
        """A checkpoint must hold exactly this model's adapter: name it clearly if not (the
        module loads with ``strict_loading=False``, since the frozen base is not in the file)."""
        expected = self.trainable_keys()
        missing = [k for k in expected if k not in state]
        wrong = [k for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape)]
        if missing or wrong:
            what = f"{len(missing)} adapter tensors missing" if missing else f"shape mismatch in {wrong[0]}"
            raise ModelError(
                f"the checkpoint does not fit this model ({what}): it was made with another base model "
                f"or LoRA config than name_or_path={self.hparams.name_or_path!r}, lora.r={self.lora.r}"
            )
