"""The LightningModule: a causal LM with LoRA adapters, trained on response tokens only.

Loss maths: ``amzft.model.loss``; adapter-only checkpoints: ``amzft.model.adapter_state`` (rebuilt into a
whole module by ``amzft.inference.load``); the NaN/inf guard: ``amzft.training.nonfinite``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from transformers import get_linear_schedule_with_warmup

from amzft.errors import ConfigError
from amzft.lightning_compat import attached_trainer
from amzft.model import generation
from amzft.model.adapter_state import AdapterCheckpointing
from amzft.model.backends import LoraSettings, build, prequantized, set_mode
from amzft.model.decoding import DEFAULT_DECODING, GenerationOptions
from amzft.model.loss import PLAIN_HEAD_MODELS, AccumulationWindow, WindowSummary, token_loss_sum
from amzft.model.neftune import NEFTune
from amzft.model.settings import GROUPS, ComputeOptions, LoraOptions, OptimOptions
from amzft.settings import hyperparameters

# Optimizer steps from which model.compute.compile=auto compiles (below, compiling costs more than it gives
# back): within the break-even measured on 2-core CPUs (docs/performance.md, "Layouts and model.compute.compile").
COMPILE_BREAK_EVEN_STEPS = 150


def decide_compile(max_steps: int | None, estimate: Callable[[], float], device: str,
                   backend: str = "hf") -> tuple[bool, str]:
    """model.compute.compile=auto: (compile?, why); ``estimate()``: an epoch-based run's planned steps, called only then."""
    if backend != "hf":
        return False, f"backend {backend} brings its own kernels"
    if max_steps is not None and max_steps >= 0:
        steps, what = max_steps, f"max_steps {max_steps}"
    else:
        steps = estimate()
        what = f"~{steps:g} optimizer steps estimated from max_epochs"
    pays_off = f"{COMPILE_BREAK_EVEN_STEPS}, the steps after which its one-time compilation pays off"
    if steps < COMPILE_BREAK_EVEN_STEPS:
        return False, f"{what} < {pays_off}"
    blocker = compile_blocker(device)
    return (False, blocker) if blocker else (True, f"{what} >= {pays_off}")


def compile_blocker(device: str) -> str | None:
    """Why torch.compile cannot train on ``device`` here (None: it can). Checked up front: an
    explicit model.compute.compile=true on such a machine fails at the first step instead."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python / platform"
    if device == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler  # noqa: PLC0415 - inductor's own search

            get_cpp_compiler()
        except Exception:  # noqa: BLE001 - whatever the reason, there is no compiler to use
            return "no C++ compiler found for torch.compile's CPU code (inductor; set CXX)"
        return None
    if device == "cuda":
        from torch.utils._triton import has_triton  # noqa: PLC0415

        return None if has_triton() else "no Triton for torch.compile's GPU code"
    return f"auto compiles on CPU and CUDA only, not {device}"


def option_problems(backend: str, lora: LoraOptions, optim: OptimOptions, compute: ComputeOptions,
                    max_new_tokens: int, neftune_alpha: float) -> list[str]:
    """Every problem of LoraCausalLM's options at once (a config is fixed in one go), one line each."""
    problems = [*lora.problems(), *optim.problems(), *compute.problems(backend)]
    if max_new_tokens < 1:
        problems.append(f"model.max_new_tokens must be >= 1, found {max_new_tokens}")
    if not (neftune_alpha >= 0 and math.isfinite(neftune_alpha)):
        problems.append(f"model.neftune_alpha must be >= 0 (0: off), found {neftune_alpha}")
    if lora.use_dora and backend != "hf":
        problems.append("model.lora.use_dora works with backend hf only (Unsloth's fused LoRA kernels have no DoRA)")
    return problems


class LoraCausalLM(AdapterCheckpointing, LightningModule):
    """Causal LM + LoRA, fine-tuned to answer "What is the description of product {title}?".

    Args:
        name_or_path: ``embedded`` (the bundled SmolLM2-135M-Instruct) or a local model directory.
        backend: how the model is built: ``hf`` (transformers + peft, CPU or GPU) or
            ``unsloth`` (the notebook's 4-bit Unsloth loader and kernels; CUDA only).
        max_length: longest sequence in tokens (linked from ``data.max_length``).
        lora: the adapters (``amzft.model.settings.LoraOptions``).
        optim: optimizer and schedule (``amzft.model.settings.OptimOptions``).
        compute: how the base is held and the step computed (``amzft.model.settings.ComputeOptions``).
        max_new_tokens: longest generated answer (ask / predict).
        on_nonfinite: a NaN/inf loss or gradient ``stop``s training or ``skip``s that optimizer
            step (``amzft.training.nonfinite.NonFiniteGuard``).
        neftune_alpha: NEFTune noise on the input embeddings while training (uniform,
            alpha / sqrt(length x hidden) at most; 5 in the NEFTune paper); 0: off. Validation,
            generation and exports are noise-free. Seeded per step, so resume stays exact.
    """

    GROUPS = GROUPS  # the grouped options, for amzft.settings.init_kwargs

    def __init__(self, name_or_path: str = "embedded", backend: Literal["hf", "unsloth"] = "hf", max_length: int = 2048,
                 lora: LoraOptions = LoraOptions(), optim: OptimOptions = OptimOptions(),
                 compute: ComputeOptions = ComputeOptions(), max_new_tokens: int = 256,
                 on_nonfinite: Literal["stop", "skip"] = "stop", neftune_alpha: float = 0.0):
        super().__init__()
        if backend == "unsloth" and compute.quantization == "nf4":
            compute = replace(compute, quantization="none")  # unsloth quantises itself; "nf4" means the same
        problems = option_problems(backend, lora, optim, compute, max_new_tokens, neftune_alpha)
        if problems:
            raise ConfigError("; ".join(problems))
        self.save_hyperparameters(hyperparameters(dict(
            name_or_path=name_or_path, backend=backend, max_length=max_length, lora=lora, optim=optim, compute=compute,
            max_new_tokens=max_new_tokens, on_nonfinite=on_nonfinite, neftune_alpha=neftune_alpha)))
        self.lora, self.optim, self.compute = lora, optim, compute
        self.build_settings = LoraSettings(
            name_or_path=name_or_path, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, seed=lora.seed,
            target_modules=list(lora.target_modules), use_dora=lora.use_dora, use_rslora=lora.use_rslora,
            gradient_checkpointing=compute.gradient_checkpointing, quantization=compute.quantization,
            dequantize=compute.dequantize_base, kernels=compute.kernels, max_seq_length=max_length)
        self.model = self.tokenizer = None
        # Only the adapter is checkpointed; the frozen base is rebuilt from name_or_path.
        self.strict_loading = False
        self.window = AccumulationWindow()  # the micro-batches of the optimizer step under way
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss/gradient (NonFiniteGuard)
        self._eval_sums: dict[str, list[float]] = {}
        self._neftune: NEFTune | None = None
        # predict's decoding: chosen at use time (the CLI's --decoding …), so no hyperparameter in checkpoints.
        self.decoding: GenerationOptions = DEFAULT_DECODING

    # ----------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is not None:  # Lightning calls this once per fit/validate/test
            return
        settings = self.build_settings
        saved_4bit = self.hparams.backend == "hf" and not settings.dequantize and prequantized(settings.name_or_path)
        if self.compute.quantization != "none" or self.hparams.backend == "unsloth" or saved_4bit or settings.kernels != "none":
            # 4-bit weights are packed on the device they load to: the trainer's (the rank's
            # GPU under DDP), or the first GPU / CPU outside a trainer; GPU kernels need a GPU there.
            device = self.trainer.strategy.root_device if attached_trainer(self) is not None else (
                torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
            settings = replace(settings, device=str(device))
        self.model, self.tokenizer = build(self.hparams.backend, settings)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.trainable_share = trainable / sum(p.numel() for p in self.model.parameters())
        self._plain_head = self.model.get_base_model().config.model_type in PLAIN_HEAD_MODELS
        if self._should_compile():
            self._compile_layers()
        self._neftune = NEFTune.attach(self.model, self.hparams.neftune_alpha, self.lora.seed)

    def _should_compile(self) -> bool:
        setting = self.compute.compile
        if setting != "auto":
            return bool(setting)
        trainer = attached_trainer(self)
        if trainer is None or trainer.state.fn != "fit":
            return False  # compiled layers serve training only (evaluation and generation run eagerly)
        chosen, reason = decide_compile(trainer.max_steps, lambda: trainer.estimated_stepping_batches,
                                        trainer.strategy.root_device.type, self.hparams.backend)
        rank_zero_info(f"model.compute.compile auto -> {'on' if chosen else 'off'}: {reason}")
        return chosen

    def _compile_layers(self) -> None:
        """Compile each decoder layer in place (``nn.Module.compile``: names and checkpoints unchanged). The
        layers share one graph (the cost of one layer); ``dynamic=True``: one graph for every sequence length."""
        layers = getattr(self.model.get_base_model().get_decoder(), "layers", None)
        if layers is None:
            raise ConfigError("model.compute.compile: this model has no decoder .layers to compile")
        for layer in layers:
            layer.compile(dynamic=True)

    # ------------------------------------------------------------------ loss
    def token_loss_sum(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Sum of next-token cross-entropy over the label (response) tokens, and their count."""
        return token_loss_sum(self.model, batch, self._plain_head, self.compute.loss_chunk_tokens,
                              fused=self.compute.kernels == "liger")

    def forward(self, batch: dict) -> torch.Tensor:
        loss_sum, n = self.token_loss_sum(batch)
        return loss_sum / max(n, 1)

    # One optimizer step, hook by hook: the table in amzft.training.stack.
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.micro_batch_shape = tuple(batch["input_ids"].shape)  # named by an out-of-memory error
        if self._neftune is not None:  # this micro-batch's noise, the same again on resume
            self._neftune.reseed(self.global_step, len(self.window.batches), self.global_rank)
        loss_sum, _ = self.token_loss_sum(batch)
        trainer = attached_trainer(self)
        accumulate, world = (trainer.accumulate_grad_batches, trainer.world_size) if trainer is not None else (1, 1)
        return self.window.add(loss_sum, int(batch["window_label_tokens"]), batch_idx, accumulate, world)

    def window_summary(self) -> WindowSummary:
        """The accumulation window about to be stepped on (computed once per optimizer step)."""
        sum_over_ranks = None
        if self.trainer.world_size > 1:
            def sum_over_ranks(value: float) -> float:
                total = torch.tensor(value, dtype=torch.float64, device=self.device)
                return float(self.trainer.strategy.reduce(total, reduce_op="sum"))
        return self.window.summary(self.model.parameters(), sum_over_ranks)

    def on_before_optimizer_step(self, optimizer) -> None:
        window = self.window_summary()
        self.log("train/loss", window.loss, on_step=True, prog_bar=True)
        self.log("train/grad_norm", window.grad_norm, on_step=True)
        self.log("train/label_tokens", float(window.label_tokens), on_step=True)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        self.window.reset()

    # ------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict, stage: str) -> None:
        if int(batch["label_tokens"]) == 0:
            # A DDP rank's filler batch (data.module.eval_shards) adds 0 to both sums; skipping the model
            # also spares a loss kernel (Liger's fused one) an empty set of label rows.
            return
        # Eagerly: under no_grad a compiled layer would compile a second graph for a few batches.
        with torch.compiler.set_stance("force_eager"):
            loss_sum, n = self.token_loss_sum(batch)
        sums = self._eval_sums.setdefault(stage, [0.0, 0])
        sums[0] += float(loss_sum)
        sums[1] += n

    def _eval_epoch_end(self, stage: str) -> None:
        loss_sum, n = self._eval_sums.pop(stage, [0.0, 0])
        # Token-weighted mean over the whole split (summed across ranks under DDP).
        totals = self.all_gather(torch.tensor([loss_sum, float(n)], dtype=torch.float64)).reshape(-1, 2).sum(0)
        if totals[1] > 0:
            # The same gathered value on every rank, for the callbacks monitoring it (best, early stopping).
            self.log(f"{stage}/loss", float(totals[0] / totals[1]), prog_bar=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        options = replace(self.decoding, max_new_tokens=self.hparams.max_new_tokens)
        answers = generation.generate(self, batch["prompt"], options, batch_size=len(batch["prompt"]))
        return [{"title": t, "reference": r, "answer": a.text, "stopped": a.stopped}
                for t, r, a in zip(batch["title"], batch["reference"], answers)]

    # ------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        h = self.optim
        kwargs = dict(lr=h.lr, betas=tuple(h.betas), eps=h.eps, weight_decay=h.weight_decay)
        if h.optimizer == "adamw_8bit":
            import bitsandbytes as bnb  # noqa: PLC0415 - heavy, and only this optimizer needs it

            optimizer = bnb.optim.AdamW8bit(params, **kwargs)
        else:
            optimizer = torch.optim.AdamW(params, **kwargs)
        # Its length comes from max_steps, not estimated_stepping_batches (Lightning issue #20550
        # with stateful loaders); an epoch-based run (max_steps -1) falls back to the estimate.
        total = self.trainer.max_steps
        total = int(self.trainer.estimated_stepping_batches) if total is None or total < 0 else total
        scheduler = get_linear_schedule_with_warmup(optimizer, h.warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_train_start(self) -> None:
        set_mode(self.hparams.backend, self.model, training=True)

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            self.print(f"amzft: {self.hparams.name_or_path} with LoRA r={self.lora.r}: "
                       f"{self.trainable_share:.2%} of parameters trainable")
        for logger in self.loggers:
            logger.log_metrics({"model/trainable_share": self.trainable_share}, step=self.global_step)
