"""A step that runs out of accelerator memory, as one line: where, on how big a micro-batch, what to lower."""

from __future__ import annotations

from pathlib import Path

from amzft.errors import ModelError

LOWER = ("lower data.batch_size (and raise trainer.accumulate_grad_batches), data.max_length or data.batches.pack_length, "
         "or set model.compute.gradient_checkpointing")


def out_of_memory_error(trainer, exc: BaseException) -> ModelError:
    """``exc`` (torch's OutOfMemoryError, raised by a fit) as a ModelError naming the optimizer step, the
    micro-batch it ran (``LoraCausalLM.micro_batch_shape``) and the options that shrink it; Lightning writes
    no checkpoint on an exception, so the last one written is what a resume continues from."""
    shape = getattr(trainer.lightning_module, "micro_batch_shape", None)
    batch = f" on a micro-batch of {shape[0]} x {shape[1]} = {shape[0] * shape[1]:,} tokens" if shape else ""
    device = "GPU" if "CUDA" in str(exc) else "accelerator"
    callback = trainer.checkpoint_callback
    last = Path(callback.dirpath or "", "last.ckpt") if callback is not None else None
    kept = (f"{last} is intact: resume with --ckpt_path last" if last is not None and last.is_file()
            else "no checkpoint was written before it")
    return ModelError(f"out of {device} memory at optimizer step {trainer.global_step + 1}{batch}: {LOWER}; {kept}")
