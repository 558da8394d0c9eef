"""The LightningModule: a causal LM with LoRA adapters, trained on response tokens only.

Loss normalisation (DESIGN.md §5): each micro-batch returns
``sum of its token losses / label tokens in the whole accumulation window × accumulate``.
Lightning divides by ``accumulate_grad_batches``, so the accumulated gradient is exactly the
gradient of the mean token loss over the window: ``batch 2 × accumulate 4`` equals
``batch 8 × accumulate 1``, however long each answer is.

Checkpoints hold the adapter (the trainable parameters) and the training state only, never the
frozen base model (DESIGN.md §6).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn

from amzft.backends import DEFAULT_TARGETS, LoraSettings, build, set_mode
from amzft.data.encode import IGNORE_INDEX
from amzft.errors import ConfigError, ModelError

MAX_CONSECUTIVE_SKIPS = 10  # with on_nonfinite=skip: beyond this the weights themselves are likely broken

# Architectures whose logits are exactly lm_head(final hidden state): for them the loss is
# computed from the label positions only, which skips most of the vocabulary projection
# (the prompt is ~30-50 % of each sequence). Others use the model's own forward.
_PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"}


def _head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def head_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets`` (one row per label token).

    With ``chunk`` > 0 and more rows than that, rows go through the head ``chunk`` at a time,
    each chunk checkpointed: its logits are freed after the forward and recomputed in backward,
    so only one chunk's vocabulary-sized tensors exist at any time."""
    if chunk <= 0 or hidden.shape[0] <= chunk:
        return _head_loss(head, hidden, targets)
    from torch.utils.checkpoint import checkpoint

    return sum(
        checkpoint(_head_loss, head, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
        for i in range(0, hidden.shape[0], chunk)
    )


class LoraCausalLM(LightningModule):
    """Causal LM + LoRA, fine-tuned to answer "What is the description of product {title}?".

    Args:
        name_or_path: ``embedded`` (the bundled SmolLM2-135M-Instruct) or a local model directory.
        backend: how the model is built: ``hf`` (transformers + peft, CPU or GPU) or
            ``unsloth`` (the seed's 4-bit Unsloth loader and kernels; CUDA only).
        max_length: longest sequence in tokens (linked from ``data.max_length``).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA input (0 in the seed; 0 keeps resume bit-exact).
        target_modules: module names that get adapters.
        gradient_checkpointing: recompute activations in backward to save memory.
        optimizer: ``adamw_8bit`` (bitsandbytes, as the seed) or ``adamw`` (torch).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: optimizer steps of linear warm-up, then linear decay to 0 at max_steps.
        lora_seed: seed for the LoRA initialisation.
        max_new_tokens: longest generated answer (ask / predict).
        quantization: ``none`` (full-precision base) or ``nf4`` (4-bit base, QLoRA; backend
            ``hf``). The ``unsloth`` backend always loads 4-bit.
        loss_chunk_tokens: compute the LM head and cross-entropy over the label tokens in chunks
            of this many tokens, each recomputed in backward (``torch.utils.checkpoint``), so the
            fp32 logits of one chunk, not of the whole micro-batch, are ever held. Unchunked, the
            logits path costs about 14 bytes x vocabulary per label token (bf16 logits, fp32
            copy, log-softmax, their gradients): ~2.5 GiB for the two longest answers of the
            real records with Llama-3.2's 128k vocabulary, the bulk of amzft's extra peak GPU
            memory over the reference (README, GPU). 0 (default) is one pass and no
            recomputation (chunking recomputes the head: an estimated +4 % FLOPs on a 1B
            model), the faster choice where memory is plentiful. Micro-batches with no more label
            tokens than this are never chunked. Plain-head architectures only (see below).
        compile: compile each decoder layer with ``torch.compile`` (dynamic shapes) for training:
            fuses the element-wise work around the matmuls (norms, rotary, SiLU, residuals,
            LoRA's scaling): +4-9 % tokens/s measured on a 2-core CPU, after a one-time
            compilation of about a minute (benchmarks/train_throughput.py, README).
            Validation and generation run the same layers eagerly. ``hf`` backend only
            (Unsloth brings its own kernels).
        on_nonfinite: a NaN/inf loss or gradient ``stop``s training (one-line error naming the
            step and batches; checkpoints already written stay intact) or ``skip``s that
            optimizer step (no update; counted in ``train/skipped_steps``; more than
            ``MAX_CONSECUTIVE_SKIPS`` in a row stops).
    """

    def __init__(
        self,
        name_or_path: str = "embedded",
        backend: Literal["hf", "unsloth"] = "hf",
        max_length: int = 2048,
        lora_r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        gradient_checkpointing: bool = False,
        optimizer: Literal["adamw_8bit", "adamw"] = "adamw_8bit",
        lr: float = 2e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 5,
        lora_seed: int = 3407,
        max_new_tokens: int = 256,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        quantization: Literal["none", "nf4"] = "none",
        compile: bool = False,
        loss_chunk_tokens: int = 0,
    ):
        super().__init__()
        problems = []
        if not (lr > 0 and math.isfinite(lr)):
            problems.append(f"model.lr must be a positive number, found {lr}")
        if lora_r < 1 or lora_alpha <= 0:
            problems.append(f"model.lora_r must be >= 1 and lora_alpha > 0, found {lora_r}, {lora_alpha}")
        if not 0 <= lora_dropout < 1:
            problems.append(f"model.lora_dropout must be in [0, 1), found {lora_dropout}")
        if warmup_steps < 0 or weight_decay < 0 or max_new_tokens < 1:
            problems.append("model.warmup_steps, weight_decay must be >= 0 and max_new_tokens >= 1")
        if loss_chunk_tokens < 0:
            problems.append(f"model.loss_chunk_tokens must be >= 0 (0: no chunking), found {loss_chunk_tokens}")
        if compile and backend != "hf":
            problems.append("model.compile works with backend hf only (Unsloth compiles its own kernels)")
        if backend == "unsloth" and quantization == "nf4":
            quantization = "none"  # unsloth quantises itself; "nf4" would mean the same thing
        if problems:
            raise ConfigError("; ".join(problems))
        self.save_hyperparameters()
        self.lora = LoraSettings(
            name_or_path=name_or_path,
            r=lora_r,
            alpha=lora_alpha,
            dropout=lora_dropout,
            target_modules=list(target_modules or DEFAULT_TARGETS),
            gradient_checkpointing=gradient_checkpointing,
            seed=lora_seed,
            quantization=quantization,
            max_seq_length=max_length,
        )
        self.model = None
        self.tokenizer = None
        # Only the adapter is checkpointed; the frozen base is rebuilt from name_or_path.
        self.strict_loading = False
        self._window_loss = 0.0  # sum of token losses in the current accumulation window
        self._window_tokens = 0
        self._window_batches: list[int] = []  # batch indices of the window, for error messages
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss/gradient
        self._consecutive_skips = 0
        self._eval_sums: dict[str, list[float]] = {}

    # ----------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is not None:  # Lightning calls this once per fit/validate/test
            return
        settings = self.lora
        if self.hparams.quantization != "none" or self.hparams.backend == "unsloth":
            from dataclasses import replace

            # 4-bit weights are packed on the device they load to: the trainer's (the rank's
            # GPU under DDP), or the first GPU / CPU outside a trainer.
            device = self.trainer.strategy.root_device if self._trainer is not None else (
                torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
            settings = replace(settings, device=str(device))
        self.model, self.tokenizer = build(self.hparams.backend, settings)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        self.trainable_share = trainable / total
        self._plain_head = self.model.get_base_model().config.model_type in _PLAIN_HEAD_MODELS
        if self.hparams.compile:
            self._compile_layers()

    def _compile_layers(self) -> None:
        """Compile each decoder layer in place (``nn.Module.compile``: parameter names and
        checkpoints are unchanged). All layers share one compiled graph, so the one-time cost is
        that of a single layer's forward + backward; ``dynamic=True`` keeps one graph for every
        sequence length instead of recompiling per batch shape."""
        layers = getattr(self.model.get_base_model().get_decoder(), "layers", None)
        if layers is None:
            raise ConfigError("model.compile: this model has no decoder .layers to compile")
        for layer in layers:
            layer.compile(dynamic=True)

    def trainable_keys(self) -> dict[str, torch.Size]:
        return {f"model.{n}": p.shape for n, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.model is None:
            return full
        keep = {prefix + k for k in self.trainable_keys()}
        return type(full)((k, v) for k, v in full.items() if k in keep)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_adapter_state(checkpoint.get("state_dict", {}))
        self.skipped_steps = int(checkpoint.get("amzft_skipped_steps", 0))

    def check_adapter_state(self, state: dict) -> None:
        """A checkpoint must hold exactly this model's adapter: name it clearly if not."""
        expected = self.trainable_keys()
        missing = [k for k in expected if k not in state]
        wrong = [k for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape)]
        if missing or wrong:
            what = f"{len(missing)} adapter tensors missing" if missing else f"shape mismatch in {wrong[0]}"
            raise ModelError(
                f"the checkpoint does not fit this model ({what}): it was made with another base model "
                f"or LoRA config than name_or_path={self.hparams.name_or_path!r}, lora_r={self.hparams.lora_r}"
            )

    # ------------------------------------------------------------------ loss
    def _inputs(self, batch: dict) -> dict:
        """Unpacked batches carry an attention mask; packed ones carry per-example position ids
        instead, from which transformers builds the block-diagonal mask (see data.batching);
        packed ones with a shared prefix carry a ready 4-D boolean mask (True = may attend)."""
        keys = ("input_ids", "attention_mask", "position_ids")
        inputs = {k: batch[k] for k in keys if batch.get(k) is not None}
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            attention = self.model.get_base_model().config._attn_implementation
            if attention == "eager":  # eager attention adds the mask to the scores: make it additive
                inputs["attention_mask"] = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
                    ~mask, torch.finfo(torch.float32).min)
            elif attention != "sdpa":
                raise ConfigError(f"data.share_prefix needs the model's sdpa or eager attention, not {attention!r}")
        return inputs

    def token_loss_sum(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Sum of next-token cross-entropy over the label (response) tokens, and their count."""
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        if self._plain_head:
            base = self.model.get_base_model()
            hidden = base.get_decoder()(
                **self._inputs(batch), use_cache=False
            ).last_hidden_state
            return head_loss_sum(base.get_output_embeddings(), hidden[:, :-1][mask], labels[mask],
                                 self.hparams.loss_chunk_tokens), int(mask.sum())
        out = self.model(**self._inputs(batch), use_cache=False)
        logits = out.logits[:, :-1][mask]
        return F.cross_entropy(logits.float(), labels[mask], reduction="sum"), int(mask.sum())

    def forward(self, batch: dict) -> torch.Tensor:
        loss_sum, n = self.token_loss_sum(batch)
        return loss_sum / max(n, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss_sum, n = self.token_loss_sum(batch)
        window = int(batch["window_label_tokens"])
        self._window_loss += float(loss_sum.detach())
        self._window_tokens = window
        self._window_batches.append(batch_idx)
        # Lightning divides by `accumulate` and DDP averages gradients over ranks; the window
        # total counts the label tokens of every rank's batches (the sampler sees them all),
        # so this makes the update exactly sum(token losses) / (tokens in the global window).
        accumulate, world = (self.trainer.accumulate_grad_batches, self.trainer.world_size) if self._trainer is not None else (1, 1)
        return loss_sum * (accumulate * world / window)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Called once per optimizer step, after the whole window's backward passes.
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
        window_loss = self._window_loss
        if self.trainer.world_size > 1:  # every rank holds its share of the window: add them up
            total = torch.tensor(window_loss, dtype=torch.float64, device=self.device)
            window_loss = float(self.trainer.strategy.reduce(total, reduce_op="sum"))
        loss = window_loss / max(self._window_tokens, 1)
        # fp16 AMP's GradScaler skips inf-gradient steps itself (they are normal there).
        scaled = str(self.trainer.precision).startswith("16")
        finite = math.isfinite(loss) and (scaled or bool(torch.isfinite(grad_norm)))
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log("train/grad_norm", grad_norm, on_step=True)
        self.log("train/label_tokens", float(self._window_tokens), on_step=True)
        batches, self._window_batches = self._window_batches, []
        self._window_loss, self._window_tokens = 0.0, 0
        if finite:
            self._consecutive_skips = 0
        else:
            self._handle_nonfinite(loss, grad_norm, batches, params)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)

    def _handle_nonfinite(self, loss: float, grad_norm: torch.Tensor, batches: list[int], params) -> None:
        what = f"the training loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {float(grad_norm)}"
        span = f"batch {batches[0]}" if len(batches) == 1 else f"batches {batches[0]}-{batches[-1]}" if batches else "no batch"
        where = f"at step {self.global_step + 1} (epoch {self.current_epoch}, {span})"
        if self.hparams.on_nonfinite == "skip" and self._consecutive_skips < MAX_CONSECUTIVE_SKIPS:
            # Dropping every gradient makes the optimizer leave the weights *and* its moments
            # untouched (torch and bitsandbytes AdamW skip parameters whose grad is None).
            for p in params:
                p.grad = None
            self.skipped_steps += 1
            self._consecutive_skips += 1
            rank_zero_warn(f"amzft: {what} {where}: step skipped (model.on_nonfinite=skip)")
            return
        checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        also = f" ({MAX_CONSECUTIVE_SKIPS} steps in a row were skipped)" if self.hparams.on_nonfinite == "skip" else ""
        raise ModelError(
            f"{what} {where}{also}; training stopped before the update, the last checkpoint "
            f"({checkpoint}) is intact: lower model.lr, look at those records, or set model.on_nonfinite=skip"
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["amzft_skipped_steps"] = self.skipped_steps

    def _eval_step(self, batch: dict, stage: str) -> None:
        # Eagerly: under no_grad a compiled layer would compile a second graph for a few batches.
        with torch.compiler.set_stance("force_eager"):
            loss_sum, n = self.token_loss_sum(batch)
        sums = self._eval_sums.setdefault(stage, [0.0, 0])
        sums[0] += float(loss_sum)
        sums[1] += n

    def _eval_epoch_end(self, stage: str) -> None:
        loss_sum, n = self._eval_sums.pop(stage, [0.0, 0])
        # Token-weighted mean over the whole split (summed across ranks under DDP).
        totals = self.all_gather(torch.tensor([loss_sum, float(n)], dtype=torch.float64))
        if totals.ndim > 1:
            totals = totals.sum(0)
        if totals[1] > 0:
            self.log(f"{stage}/loss", float(totals[0] / totals[1]), prog_bar=True, rank_zero_only=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        from amzft.generate import GenerationOptions, generate

        options = GenerationOptions(max_new_tokens=self.hparams.max_new_tokens)
        answers = generate(self, batch["prompt"], options, batch_size=len(batch["prompt"]))
        return [
            {"title": t, "reference": r, "answer": a.text, "stopped": a.stopped}
            for t, r, a in zip(batch["title"], batch["reference"], answers)
        ]

    # ------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        h = self.hparams
        kwargs = dict(lr=h.lr, betas=tuple(h.betas), eps=h.eps, weight_decay=h.weight_decay)
        if h.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(params, **kwargs)
        else:
            optimizer = torch.optim.AdamW(params, **kwargs)
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        warmup = h.warmup_steps

        def linear_warmup_decay(step: int) -> float:
            # As transformers' get_linear_schedule_with_warmup, stepped per optimizer step.
            if step < warmup:
                return step / max(1, warmup)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_train_start(self) -> None:
        set_mode(self.hparams.backend, self.model, training=True)

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            self.print(
                f"amzft: {self.hparams.name_or_path} with LoRA r={self.hparams.lora_r}: "
                f"{self.trainable_share:.2%} of parameters trainable"
            )
        for logger in self.loggers:
            logger.log_metrics({"model/trainable_share": self.trainable_share}, step=self.global_step)
