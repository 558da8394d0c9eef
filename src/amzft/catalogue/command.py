"""``python -m amzft describe --ckpt_path best --data.path titles.jsonl --out descriptions.jsonl``.

Paths and options are checked before anything heavy is imported. Under ``--trainer.devices N --trainer.strategy
ddp`` Lightning's launcher runs this command once more per extra process: each reads the manifest the first wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from amzft.errors import ConfigError, DataError
from amzft.model.decoding import decoding_from, describe
from amzft.settings import as_dict


def describe_catalogue(cfg) -> None:
    """``describe``: every title of ``cfg.data.path`` answered into ``cfg.out`` (the parsed options of
    ``amzft.cli.commands.describe_command``)."""
    decoding_from(cfg)  # a bad value fails here, before the model loads
    source, store = _checked_paths(cfg)
    titles = _count_titles(source, cfg.data.strict)  # a file with nothing to answer fails before the model loads

    from lightning.pytorch.utilities import rank_zero_only

    from amzft.checkpoints.locate import resolve_ckpt_path
    from amzft.inference.load import load_answerer

    accelerator, precision = _device(cfg.trainer)
    ckpt = resolve_ckpt_path(cfg.ckpt_path, cfg.log_root) if cfg.ckpt_path else None
    answerer = load_answerer(ckpt, as_dict(cfg.model))
    module, fmt = answerer.module, answerer.prompt
    plan, options, identity = _settings(cfg, module, fmt, answerer.data_settings, source, ckpt, precision)
    say = print if rank_zero_only.rank == 0 else (lambda *a, **k: None)
    # Lightning's extra processes start once the first has written the manifest: they find it.
    if store.start(identity, create=rank_zero_only.rank == 0) == "complete":
        say(f"{store.out} is complete ({_meta_written(store)} descriptions, written with these settings): nothing to do")
        return
    _describe(cfg, source, store, module, fmt, plan, options, identity, accelerator, say, titles)


def _checked_paths(cfg):
    """The input file and the output store, checked before anything heavy loads (a refused output should not cost a minute)."""
    from amzft.catalogue.store import OutputStore
    from amzft.data.reader import check_data_file

    source = check_data_file(cfg.data.path)
    store = OutputStore(cfg.out)
    if store.out.is_dir():
        raise ConfigError(f"--out {store.out} is a directory; give a file name such as descriptions.jsonl")
    if store.out.resolve() == source.resolve():
        raise ConfigError(f"--out {cfg.out} is the input file")
    if store.out.exists() and not store.manifest.is_file() and not store.meta.is_file():
        raise ConfigError(f"{store.out} exists and was not written by amzft describe: delete it or choose another --out")
    for name in ("token_budget", "max_batch"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, found {getattr(cfg, name)}")
    return source, store


def _count_titles(source: Path, strict: bool) -> int:
    """The usable titles of ``source`` (for the ETA); none at all is a one-line error naming
    what the lines lacked. One pass over the file: seconds for millions of lines."""
    from amzft.catalogue.titles import read_titles
    from amzft.data.stats import PipelineStats

    stats = PipelineStats()
    count = sum(1 for _ in read_titles(source, stats, strict))
    if count == 0:
        raise DataError(f"{source}: no title to describe in its {stats.records_read} lines ({_skipped(stats)}); describe reads JSON "
                        'Lines with one {"title": ...} object per line (uid and content optional)')
    return count


def _skipped(stats) -> str:
    return ", ".join(f"{reason}={n} (first lines {stats.skipped_lines[reason]})" for reason, n in stats.skipped.items())


def _device(trainer) -> tuple[str, str]:
    import torch

    accelerator = trainer.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    gpu = accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    if gpu and "LOCAL_RANK" in os.environ:
        # 4-bit bases are packed on the current GPU when they load, before the trainer places them.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # On a CPU fp32: bf16 autocast is slower than fp32 on some CPUs and faster on others
    # (docs/performance.md, "The machines"), and the answers must not depend on a timing probe.
    return accelerator, trainer.precision or ("bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true")


def _settings(cfg, module, fmt, data_settings: dict, source: Path, ckpt: str | None, precision: str):
    """(batch plan, decoding, identity): the identity is everything the answers depend on,
    recorded in the run's manifest so a resume with other settings is refused."""
    from amzft.catalogue.plan import PlanSettings

    plan = PlanSettings(token_budget=cfg.token_budget, max_batch=cfg.max_batch,
                        max_new_tokens=cfg.max_new_tokens or int(module.hparams.max_new_tokens),
                        max_prompt_tokens=int(module.hparams.max_length))
    options = decoding_from(cfg, max_new_tokens=plan.max_new_tokens)
    identity = {
        "input": _file_identity(source),
        "checkpoint": _file_identity(Path(ckpt)) if ckpt else None,
        "model": module.hparams.name_or_path,
        "use_adapter": bool(cfg.use_adapter and ckpt),
        "decoding": asdict(options),
        "prompt": asdict(fmt),
        "strip_boilerplate": bool(as_dict(data_settings.get("filters")).get("strip_boilerplate", True)),
        "plan": asdict(plan),
        "precision": str(precision),
    }
    return plan, options, identity


def _describe(cfg, source: Path, store, module, fmt, plan, options, identity: dict, accelerator: str, say,
              titles: int) -> None:
    from lightning.pytorch import Trainer

    from amzft.catalogue.run import CatalogueData, Describer, PartWriter

    done = store.done_lines()
    total = titles - len(done)
    model = identity["checkpoint"]["path"] if identity["checkpoint"] else identity["model"]
    say(f"describe: {source} -> {store.out}; {f'resuming: {len(done)} already written, ' if len(done) else ''}"
        f"~{total} titles to answer with {model}{' (adapter off)' if cfg.ckpt_path and not identity['use_adapter'] else ''}; "
        f"decoding: {describe(options)}")
    data = CatalogueData(str(source), module.tokenizer, fmt, plan, done, cfg.data.strict, identity["strip_boilerplate"])
    started = time.perf_counter()

    def summary() -> dict:
        return {"input_lines": data.stats.records_read, "skipped": dict(data.stats.skipped),
                "skipped_lines": data.stats.skipped_lines, "seconds_last_run": round(time.perf_counter() - started, 1),
                "processes_last_run": trainer.world_size}

    writer = PartWriter(store, total, summary, cfg.progress_every)
    trainer = Trainer(accelerator=accelerator, devices=cfg.trainer.devices, strategy=cfg.trainer.strategy,
                      precision=identity["precision"], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                      callbacks=[writer])
    trainer.predict(Describer(module, options, identity["use_adapter"]), datamodule=data, return_predictions=False)
    if trainer.is_global_zero:
        skipped = _skipped(data.stats)
        say(f"describe: {writer.merged} descriptions written to {store.out} in input order "
            f"({writer.written} on this process this run, {len(done)} from before); {data.stats.records_read} lines read"
            f"{'; skipped: ' + skipped if skipped else ''}; run record: {store.meta}")


def _file_identity(path: Path) -> dict:
    """What makes a file the same one: its bytes (hashed whole: a fraction of a second per
    100 MB, next to the hours a catalogue takes to describe)."""
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest}


def _meta_written(store) -> int | str:
    try:
        return json.loads(store.meta.read_text()).get("written", "?")
    except (OSError, ValueError):
        return "?"
