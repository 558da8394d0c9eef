"""The LightningCLI for fit / validate / test / predict: amzft's option groups and links
(``model.name_or_path`` -> ``data.tokenizer``, ``data.max_length`` -> ``model.max_length``), ``--ckpt_path
last`` / ``best`` resolved to a file (a resume logs into the same TensorBoard run), ``trainer.precision:
auto`` resolved before the config is saved, and the callbacks in ``amzft.training.stack``'s order.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from amzft.checkpoints.best import BestCheckpoint
from amzft.checkpoints.io import AtomicCheckpointIO, check_checkpoint_file, check_writable
from amzft.checkpoints.locate import LOG_NAME, resolve_ckpt_path, run_version
from amzft.data.module import AmazonTitlesDataModule
from amzft.errors import ConfigError
from amzft.lightning_compat import TrainerBuildHook
from amzft.model.decoding import add_decoding_arguments, decoding_from
from amzft.model.module import LoraCausalLM
from amzft.training.callbacks import SampleAnswers
from amzft.training.precision import AmzftTrainer, resolve
from amzft.training.stack import fit_callbacks
from amzft.training.validation import ValidationSchedule


class AmzftCLI(TrainerBuildHook, LightningCLI):
    """``ckpt_path`` (resolved, ``last`` included) is kept on the instance so that code driving
    the trainer itself (``run=False``: the demo, tests) resumes exactly as ``fit`` does."""

    def __init__(self, *args, ckpt_path: str | None = None, **kwargs):
        self._resume_version = self._early_stop = self._decoding = None  # set by before_instantiate_classes
        self.ckpt_path = ckpt_path
        kwargs.setdefault("trainer_class", AmzftTrainer)  # accepts trainer.precision: auto
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Lightning's CLI loads a --ckpt_path file next, with torch's own error for a broken one.
        ckpt_path = (self.config.get(self.config.get("subcommand") or "", None) or {}).get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_file(ckpt_path)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.name_or_path", "data.tokenizer")
        parser.link_arguments("data.max_length", "model.max_length")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SampleAnswers, "sample_answers")
        parser.add_lightning_class_args(ValidationSchedule, "validation")
        parser.add_lightning_class_args(BestCheckpoint, "best")
        add_decoding_arguments(parser)
        # Plain options, not a callback group: the callback exists only when enabled.
        parser.add_argument("--early_stopping.patience", type=int, default=0,
                            help="stop after this many validations without improvement of best.monitor; 0: off")
        parser.add_argument("--early_stopping.min_delta", type=float, default=0.0,
                            help="smallest change of best.monitor that counts as an improvement")
        parser.set_defaults({
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": -1,
            "checkpoint.every_n_train_steps": 20,
            "checkpoint.filename": "step{step:05d}",
            "checkpoint.auto_insert_metric_name": False,
            # A resumed run writes into the same folder: overwrite last.ckpt (and the step files it
            # re-creates) instead of adding last-v1.ckpt, which `--ckpt_path last` would never find.
            "checkpoint.enable_version_counter": False,
            "trainer.default_root_dir": "logs",
            "trainer.log_every_n_steps": 1,
            # amzft's batch sampler shards itself across ranks (see data.sampler).
            "trainer.use_distributed_sampler": False,
        })

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or "logs"
        # Before anything writes there (the config copy, TensorBoard, checkpoints).
        check_writable(root)
        if self.subcommand is not None:
            self.ckpt_path = config.get("ckpt_path")
        if self.ckpt_path == "best" and self.subcommand in ("fit", None):
            raise ConfigError("fit --ckpt_path best is not supported: resume with --ckpt_path last "
                              "(best serves validate, test, predict, ask, evaluate and export)")
        if self.ckpt_path in ("last", "best"):
            # Lightning's own "best" means the best of a fit in this same process: resolve it to
            # a file before Lightning sees it, as "last".
            self.ckpt_path = resolve_ckpt_path(self.ckpt_path, root)
            if self.subcommand is not None:
                config.ckpt_path = self.ckpt_path
            self._resume_version = run_version(self.ckpt_path)
        model, data = config.get("model"), config.get("data")
        layout = (data.get("batches") or {}).get("layout") if data is not None else None
        if model is not None and model.get("backend") == "unsloth" and layout == "packed":
            # Unsloth's attention keeps packed examples apart only for single-row batches without
            # a mask (it reads the boundaries from position ids then); amzft's packed rows would
            # attend across examples there: a silently wrong loss. Grouped batches gain Unsloth
            # nothing either (docs/gpu.md, "Measured on an NVIDIA H200").
            raise ConfigError("data.batches.layout=packed does not work with model.backend=unsloth (its attention would "
                              "cross example boundaries in packed rows); use data.batches.layout=plain or grouped")
        # Before the config is saved into the run's folder, which then records the precision used.
        config.trainer.precision = resolve(config.trainer.get("precision"), config.trainer.get("accelerator") or "auto")
        accumulate = config.trainer.accumulate_grad_batches
        if accumulate is not None and accumulate < 1:
            raise ConfigError(f"trainer.accumulate_grad_batches must be >= 1, found {accumulate}")
        self._early_stop = _selection_settings(config)
        self._decoding = decoding_from(config)  # a bad value fails here, before the model loads

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # predict's answers and val/rougeL decode as ask / evaluate / demo do (amzft.model.decoding).
        self.model.decoding = self._decoding or self.model.decoding
        for callback in self.trainer.callbacks:
            if isinstance(callback, SampleAnswers):
                callback.options = self._decoding or callback.options

    def trainer_parts(self, config, callbacks):
        root = config.get("default_root_dir") or "logs"
        if config.get("logger") in (None, True):
            config["logger"] = TensorBoardLogger(save_dir=root, name=LOG_NAME, version=self._resume_version, default_hp_metric=False)
        plugins = config.get("plugins") or []
        config["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), AtomicCheckpointIO()]
        given = config.get("callbacks") or []
        config["callbacks"] = []  # placed by fit_callbacks, after the non-finite guard
        summary = config.get("enable_model_summary") is not False
        callbacks = fit_callbacks(callbacks, given if isinstance(given, list) else [given], early_stop=self._early_stop,
                                  progress_bar=config.get("enable_progress_bar") is not False, model_summary=summary)
        if summary:
            config["enable_model_summary"] = False  # amzft's summary replaces Lightning's (which would say it skips)
        return config, callbacks


def _selection_settings(config) -> dict | None:
    """Checks ``validation`` / ``best`` / ``early_stopping`` together, turns ``validation.every_n_steps``
    into the trainer settings it needs, and returns the early stopping callback's arguments (None: off)."""
    trainer = config.trainer
    every = (config.get("validation") or {}).get("every_n_steps") or 0
    if every > 0:
        if trainer.get("val_check_interval") is not None:
            raise ConfigError("set either validation.every_n_steps (optimizer steps) or trainer.val_check_interval "
                              "(training batches), not both")
        # ValidationSchedule makes the decision; these keep Lightning's own checks out of the
        # way (no epoch gating) and its bookkeeping consistent (validation loaders, progress bar).
        trainer.check_val_every_n_epoch = None
        trainer.val_check_interval = every * (trainer.get("accumulate_grad_batches") or 1)
    monitor = (config.get("best") or {}).get("monitor")
    rouge = (config.get("sample_answers") or {}).get("rouge_products", 8)
    if monitor == "val/rougeL" and not rouge:
        raise ConfigError("best.monitor=val/rougeL needs sample_answers.rouge_products > 0 (it computes val/rougeL)")
    early = config.get("early_stopping") or {}
    if not early.get("patience"):
        return None
    if early["patience"] < 0:
        raise ConfigError(f"early_stopping.patience must be >= 0 (0: off), found {early['patience']}")
    return {"monitor": monitor or "val/loss", "patience": early["patience"], "min_delta": early.get("min_delta") or 0.0}


def cli_main(args: list[str] | None = None, run: bool = True) -> AmzftCLI:
    """``run=False`` builds model, data and trainer without running (``args`` may still start
    with ``fit`` and carry ``--ckpt_path``; resume with ``trainer.fit(..., ckpt_path=cli.ckpt_path)``)."""
    ckpt_path = None
    if not run and args is not None:
        args = list(args[1:] if args and args[0] == "fit" else args)
        if "--ckpt_path" in args:
            i = args.index("--ckpt_path")
            ckpt_path = args.pop(i + 1)
            del args[i]
    return AmzftCLI(
        LoraCausalLM,
        AmazonTitlesDataModule,
        seed_everything_default=3407,
        save_config_kwargs={"overwrite": True},
        # Parse errors raise instead of printing the whole usage: amzft.cli.main makes them one line.
        parser_kwargs={"exit_on_error": False, "prog": "python -m amzft",
                       **{c: {"exit_on_error": False} for c in ("fit", "validate", "test", "predict")}},
        args=args,
        run=run,
        ckpt_path=ckpt_path,
    )
