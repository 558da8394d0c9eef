"""The training loss: next-token cross-entropy on response tokens, normalised per accumulation window.

Lightning's mean of per-micro-batch losses would weight short answers' tokens more than long ones'.
Instead each micro-batch returns ``sum of its token losses / label tokens in the whole window x accumulate
x world``; Lightning divides by ``accumulate_grad_batches`` and DDP averages over ranks, so the update is
exactly ``sum(token losses) / (label tokens in the global window)``: ``batch 2 x accumulate 4`` gives the
gradient of ``batch 8 x accumulate 1``. The window's token count comes with each batch
(``window_label_tokens``, counted by the batch sampler, which sees every rank's batches).

Only label positions go through the LM head where the architecture allows it (``PLAIN_HEAD_MODELS``):
the prompt is a large share of each sequence and its logits are never used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from amzft.errors import ConfigError

# The label of a position not learnt (prompt, padding), torch's cross_entropy default; amzft.data.encode writes it.
IGNORE_INDEX = -100

# Architectures whose logits are exactly lm_head(final hidden state): their loss uses label positions only.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"}


def _head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def head_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int,
                  fused: bool = False) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets`` (one row per label token).

    With ``chunk`` > 0 and more rows than that, rows go through the head ``chunk`` at a time, each chunk
    checkpointed (its logits recomputed in backward), so only one chunk's vocabulary-sized tensors exist.
    ``fused`` (``model.compute.kernels: liger``, CUDA): Liger's fused linear cross-entropy, one chunked
    Triton pass computing the gradient during the forward, so the fp32 logits are never held and nothing
    is recomputed (Liger sizes its chunks; the frozen head gets no gradient)."""
    if fused:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: PLC0415 - optional, CUDA only

        return liger_fused_linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, reduction="sum")
    if chunk <= 0 or hidden.shape[0] <= chunk:
        return _head_loss(head, hidden, targets)
    return sum(checkpoint(_head_loss, head, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
               for i in range(0, hidden.shape[0], chunk))


def model_inputs(batch: dict, attention: str) -> dict:
    """The model's keyword inputs: unpacked batches carry an attention mask; packed ones position ids, from
    which transformers builds the block-diagonal mask (data.collate); packed ones with a shared prefix a
    ready 4-D boolean mask (True = may attend), which eager attention needs as an additive mask."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        if attention == "eager":  # eager attention adds the mask to the scores
            inputs["attention_mask"] = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min)
        elif attention != "sdpa":
            raise ConfigError(f"data.batches.share_prefix needs the model's sdpa or eager attention, not {attention!r}")
    return inputs


def token_loss_sum(peft_model, batch: dict, plain_head: bool, chunk: int = 0, fused: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the label (response) tokens, and their count. ``plain_head``:
    the decoder, then the LM head on label positions only (``head_loss_sum``); else the model's own forward."""
    base = peft_model.get_base_model()
    inputs = model_inputs(batch, base.config._attn_implementation)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    if plain_head:
        hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
        head = base.get_output_embeddings()
        return head_loss_sum(head, hidden[:, :-1][mask], labels[mask], chunk, fused), int(mask.sum())
    logits = peft_model(**inputs, use_cache=False).logits[:, :-1][mask]
    return F.cross_entropy(logits.float(), labels[mask], reduction="sum"), int(mask.sum())


@dataclass(frozen=True)
class WindowSummary:
    """One accumulation window, as the optimizer is about to step on it."""

    loss: float  # mean token loss over the (global) window
    grad_norm: float
    label_tokens: int
    batches: list[int]  # batch indices, for error messages


@dataclass
class AccumulationWindow:
    """The micro-batches of one optimizer step: ``add`` each in ``training_step``, ``summary`` before the
    optimizer steps (the non-finite guard and the logging read the same one), ``reset`` after it."""

    loss_sum: float = 0.0  # this rank's summed token losses so far
    label_tokens: int = 0  # label tokens of the whole global window (the sampler counts them)
    batches: list[int] = field(default_factory=list)
    _summary: WindowSummary | None = None

    def add(self, loss_sum: torch.Tensor, window_tokens: int, batch_idx: int, accumulate: int,
            world: int) -> torch.Tensor:
        """Note a micro-batch; its share of the window's mean token loss, pre-multiplied by what Lightning
        (``accumulate``) and DDP (``world``) will divide it by (see the module docstring)."""
        self.loss_sum += float(loss_sum.detach())
        self.label_tokens = window_tokens
        self.batches.append(batch_idx)
        return loss_sum * (accumulate * world / window_tokens)

    def summary(self, parameters, sum_over_ranks=None) -> WindowSummary:
        """The window's mean token loss and gradient norm, computed on the first call of a step.
        ``sum_over_ranks``: adds a float over DDP ranks (each holds its share of the window)."""
        if self._summary is None:
            grads = [p.grad for p in parameters if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            loss = self.loss_sum if sum_over_ranks is None else sum_over_ranks(self.loss_sum)
            self._summary = WindowSummary(loss / max(self.label_tokens, 1), float(grad_norm), self.label_tokens,
                                          list(self.batches))
        return self._summary

    def reset(self) -> None:
        self.loss_sum, self.label_tokens, self.batches, self._summary = 0.0, 0, [], None
