"""The pipeline's entry: data settings in; build, encode (lazy) and batch (sampler, collate); loaders out."""

from __future__ import annotations

import logging
from functools import cached_property

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from amzft.data.build import DataSettings, PreparedData, prepare
from amzft.data.clean import FilterSettings
from amzft.data.collate import Collator, TokenizedDataset
from amzft.data.prompt import PromptFormat
from amzft.data.reader import LEGACY_HINT
from amzft.data.sampler import Batch, ResumableBatchSampler
from amzft.data.settings import GROUPS, BatchOptions, HoldoutOptions, ReadOptions
from amzft.data.split import seeded_sample
from amzft.errors import ConfigError
from amzft.files import shipped_sample
from amzft.lightning_compat import batches_run_this_epoch, epoch_number
from amzft.settings import hyperparameters
from amzft.sources import load_tokenizer

log = logging.getLogger(__name__)

COUNT_ALL_UP_TO = 10_000  # packed splits up to this size are counted whole first (an exact epoch length)


def eval_shards(batches: list[list[int]], world: int) -> list[list[list[int]]]:
    """Each DDP rank's evaluation batches (rank r's at index r), at least one per rank (Lightning refuses a loader empty
    on some ranks only): the batches dealt round-robin, else the examples cut into ``world`` batches, else one each and
    for the other ranks a filler batch with every label masked. Every real example is scored once."""
    if len(batches) >= world:
        return [batches[rank::world] for rank in range(world)]
    order = [int(i) for b in batches for i in b]
    if len(order) >= world:
        return [[Batch(part.tolist())] for part in np.array_split(np.asarray(order), world)]
    filler = Batch(order[:1])
    filler.filler = True
    return [[Batch([order[rank]]) if rank < len(order) else filler] for rank in range(world)]


class _EvalExamples(TokenizedDataset):
    """TokenizedDataset that gives a filler batch (``Batch.filler``) no labels."""

    def __getitems__(self, indices: list[int]) -> dict:
        batch = super().__getitems__(indices)
        if getattr(indices, "filler", False):  # plain index lists have none
            # Labels start after the prompt (Collator): a prompt as long as the example, none.
            batch["prompt_len"] = [len(ids) for ids in batch["input_ids"]]
        return batch


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A DataLoader Lightning sees as stateful: a mid-epoch checkpoint resumes at the next unseen batch, not the epoch's start."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


class AmazonTitlesDataModule(LightningDataModule):
    """AmazonTitles-1.3MM ``trn.json`` records as Alpaca prompts with response-only labels.

    Args:
        path: trn.json / .jsonl, plain or gzip. None: the small sample shipped with amzft.
        tokenizer: ``embedded`` (SmolLM2), ``llama3.2`` or a local tokenizer directory (the CLI
            links it from ``model.name_or_path``).
        max_length: longest example in tokens; longer responses are cut (the prompt is kept).
        batch_size: examples per micro-batch for training.
        eval_batch_size: examples per batch for validation and test.
        prompt: the question and template (``amzft.data.prompt.PromptFormat``).
        filters: which records are kept (``amzft.data.clean.FilterSettings``).
        holdout: held-out products (``amzft.data.settings.HoldoutOptions``).
        batches: order and layout of training batches (``amzft.data.settings.BatchOptions``).
        read: how the file's bytes are read (``amzft.data.settings.ReadOptions``).
        limit: read at most this many records.
        num_proc: processes that build the cache and count all examples' tokens where needed
            (small packed splits, evaluation, the report); null: one per core; 1: this process.
        cache_dir: where the cleaned datasets go (default: ~/.cache/amzft/datasets).
    """

    GROUPS = GROUPS  # the grouped options, for amzft.settings.init_kwargs

    def __init__(self, path: str | None = None, tokenizer: str = "embedded", max_length: int = 2048, batch_size: int = 2,
                 eval_batch_size: int = 8, prompt: PromptFormat = PromptFormat(), filters: FilterSettings = FilterSettings(),
                 holdout: HoldoutOptions = HoldoutOptions(), batches: BatchOptions = BatchOptions(), read: ReadOptions = ReadOptions(),
                 limit: int | None = None, num_proc: int | None = None, cache_dir: str | None = None):
        super().__init__()
        problems = [*filters.problems(), *holdout.problems(), *batches.problems(), *read.problems()]
        if max_length < 8:
            problems.append(f"data.max_length must be >= 8, found {max_length}")
        if batch_size < 1 or eval_batch_size < 1:
            problems.append(f"data.batch_size and eval_batch_size must be >= 1, found {batch_size}, {eval_batch_size}")
        for name, value in (("num_proc", num_proc), ("limit", limit)):
            if value is not None and value < 1:
                problems.append(f"data.{name} must be >= 1 or null, found {value}")
        if problems:
            raise ConfigError("; ".join(problems))
        self.save_hyperparameters(hyperparameters(dict(
            path=path, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size, eval_batch_size=eval_batch_size,
            prompt=prompt, filters=filters, holdout=holdout, batches=batches, read=read, limit=limit,
            num_proc=num_proc, cache_dir=cache_dir)))
        self.settings = DataSettings(str(path) if path else str(shipped_sample()), max_length, filters, prompt,
                                     holdout.val_fraction, holdout.test_fraction, holdout.salt, read.strict, limit, read.codec())
        self.tokenizer_name = tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.holdout, self.batches = holdout, batches
        self.num_proc, self.cache_dir = num_proc, cache_dir
        self.prepared: PreparedData | None = None

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_name)

    def prepare_data(self) -> None:
        # Runs on one process per node: builds the Arrow cache the other ranks then reopen.
        prepare(self.settings, self.tokenizer, self.cache_dir, self.num_proc)

    def setup(self, stage: str | None = None) -> None:
        if self.prepared is None:
            self.prepared = prepare(self.settings, self.tokenizer, self.cache_dir, self.num_proc)
            stats = self.prepared.stats
            log.info("data: %d read, %d kept (train %d / validation %d / test %d), skipped %s", stats.records_read,
                     stats.kept, *(stats.split_sizes[s] for s in ("train", "validation", "test")), dict(stats.skipped))
            if stats.skipped["non_utf8"] and self.settings.encoding is None:
                log.warning("data: %d %s", stats.skipped["non_utf8"], LEGACY_HINT)

    def split(self, name: str):
        self.setup()
        return self.prepared.splits[name]

    def collator(self, train: bool = False) -> Collator:
        return Collator(self.tokenizer.pad_token_id, self.batches.pad_to_multiple_of,
                        share_prefix=train and self.batches.share_prefix)

    def examples(self, name: str):
        """The split's examples, tokenised on demand (data.lazy.LazyExamples)."""
        self.setup()
        return self.prepared.examples(name)

    def train_dataloader(self):
        data = self.examples("train")
        if len(data) == 0:
            raise ConfigError(f"{self.settings.path}: the train split is empty (lower data.holdout.val_fraction / test_fraction)")
        trainer, opts = getattr(self, "trainer", None), self.batches
        num_labels, lengths = self._train_counts(data)
        # The sampler shards itself across DDP ranks: Lightning's DistributedSampler cannot wrap accumulation windows.
        sampler = ResumableBatchSampler(
            num_labels, self.batch_size, int(trainer.accumulate_grad_batches) if trainer is not None else 1, opts.seed,
            opts.shuffle, lengths=lengths, layout=opts.layout, max_length=opts.pack_length or self.settings.max_length,
            mega_batch=opts.mega_batch, num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0)
        if len(sampler) == 0:
            # Lightning would only warn ("No training batches") and stop without a checkpoint.
            raise ConfigError(f"{self.settings.path}: the train split ({len(data)} examples) makes no batch for each of "
                              f"{sampler.num_replicas} processes; use fewer processes, a smaller data.batch_size or more data")
        if trainer is not None:
            # the trainer's count of batches run (loaders fetch ahead) and its epoch (what set_epoch would get)
            sampler.progress = lambda: batches_run_this_epoch(self.trainer)
            sampler.epoch_source = lambda: epoch_number(self.trainer)
        return ResumableDataLoader(TokenizedDataset(data), batch_sampler=sampler, collate_fn=self.collator(train=True),
                                   num_workers=opts.num_workers)

    def _train_counts(self, data):
        """(label counts, lengths) for the train sampler, lazy except for a small packed split (its exact epoch
        length needs every length): by the split's size only, never the cache, so every run has the same epochs."""
        if self.batches.layout == "plain":
            return data.label_counts(), None
        if self.batches.layout == "packed" and len(data) <= COUNT_ALL_UP_TO:
            return data.ensure_counts(self.num_proc)
        return data.label_counts(), data.token_lengths()

    def _eval_loader(self, name: str, max_examples: int | None = None):
        data = self.examples(name)
        if len(data) == 0:
            return []  # Lightning skips an empty loader list: no validation on this split
        if max_examples is not None and len(data) > max_examples:
            data = data.subset(np.sort(seeded_sample(len(data), max_examples, self.batches.seed)))
        num_labels, lengths = data.ensure_counts()
        trainer = getattr(self, "trainer", None)
        # eval order does not matter: group by length, pad less
        sampler = ResumableBatchSampler(num_labels, self.eval_batch_size, shuffle=False, lengths=lengths, layout="grouped",
                                        mega_batch=10**9)
        dataset = TokenizedDataset(data)
        if trainer is not None and trainer.world_size > 1:
            # each rank scores a disjoint share, at least one batch; the module sums loss and token counts across ranks
            sampler = eval_shards(list(sampler), trainer.world_size)[trainer.global_rank]
            dataset = _EvalExamples(data)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collator(),
                                           num_workers=self.batches.num_workers)

    def val_dataloader(self):
        return self._eval_loader("validation", self.holdout.val_max_examples)

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        """Prompts (not tokenised: generation tokenises and left-pads them) with references."""
        data = self.split(self.holdout.predict_split)
        limit = self.holdout.predict_limit
        rows = data.select(range(len(data) if limit is None else min(len(data), limit))).select_columns(["title", "content"])
        fmt = self.settings.prompt
        items = [{"title": t, "reference": c, "prompt": fmt.render(t)} for t, c in zip(rows["title"], rows["content"])]
        return torch.utils.data.DataLoader(items, batch_size=self.eval_batch_size)  # batches: dicts of lists
