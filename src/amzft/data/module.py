"""The LightningDataModule: settings in, memory-mapped cleaned splits (tokenised on demand) and
loaders out."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from amzft.data.batching import Collator, ResumableBatchSampler, TokenizedDataset
from amzft.data.build import DataSettings, PreparedData, prepare
from amzft.data.clean import FilterSettings
from amzft.data.prompt import ALPACA_TEMPLATE, SEED_QUESTION, PromptFormat
from amzft.data.reader import check_data_file
from amzft.errors import ConfigError
from amzft.files import shipped_sample
from amzft.model.sources import load_tokenizer
from amzft.training.lightning_compat import batches_run_this_epoch, epoch_number

log = logging.getLogger(__name__)

# Packed splits up to this many examples are counted whole before training (~10 s on one core),
# which gives an exact epoch length; bigger ones are packed as the epoch reaches them.
COUNT_ALL_UP_TO = 10_000


def counted(examples, num_proc: int | None = None):
    """(label counts, token lengths) of every example of ``examples`` as numpy arrays, tokenising
    those not counted yet (and keeping the counts beside the cache for the next run)."""
    examples.ensure_counts(num_proc)
    return examples.num_labels, examples.lengths


class _EvalBatch(list):
    """Dataset indices of one evaluation batch; a ``filler`` one is scored with no labels."""

    filler = False


def eval_shards(batches: list[list[int]], world: int) -> list[list[list[int]]]:
    """Each DDP rank's evaluation batches (rank r's at index r), at least one per rank.

    Lightning refuses an evaluation loader that is empty on one rank while not on all
    (``has_len_all_ranks``: "`DataLoader` within local rank has zero length"), which a small
    split hits when it has fewer batches than ranks. So:

    * at least ``world`` batches: round-robin, the batches as one process has them (uneven
      counts are fine: evaluation has no collective per step);
    * fewer batches but at least ``world`` examples: the examples, in the same (length) order,
      cut into ``world`` batches of n // world or n // world + 1 (no bigger than the batch size,
      as n < world x batch size here; ``array_split``, not batches of ceil(n / world), which
      can give fewer than ``world`` batches: 4 examples, 3 ranks);
    * fewer examples than ranks: one example each, and a filler batch for the others that
      repeats a real example with every label masked, so it adds 0 loss and 0 label tokens to
      the module's token-weighted sums.

    Every real example is scored exactly once across the ranks, so the (token-weighted) loss is
    the single-process one."""
    if len(batches) >= world:
        return [batches[rank::world] for rank in range(world)]
    order = [int(i) for b in batches for i in b]
    if len(order) >= world:
        return [[_EvalBatch(part.tolist())] for part in np.array_split(np.asarray(order), world)]
    filler = _EvalBatch(order[:1])
    filler.filler = True
    return [[_EvalBatch([order[rank]]) if rank < len(order) else filler] for rank in range(world)]


class _EvalExamples(TokenizedDataset):
    """TokenizedDataset that gives a filler batch (``_EvalBatch.filler``) no labels."""

    def __getitems__(self, indices: list[int]) -> dict:
        batch = super().__getitems__(indices)
        if getattr(indices, "filler", False):
            # Labels start after the prompt (Collator): a prompt as long as the example, none.
            batch["prompt_len"] = [len(ids) for ids in batch["input_ids"]]
        return batch


def _columns(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A DataLoader Lightning recognises as stateful (it has state_dict/load_state_dict), so a
    mid-epoch checkpoint resumes at the next unseen batch instead of restarting the epoch."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


class AmazonTitlesDataModule(LightningDataModule):
    """AmazonTitles-1.3MM ``trn.json`` records as Alpaca prompts with response-only labels.

    Args:
        path: trn.json / .jsonl, plain or gzip. None: the small sample shipped with amzft.
        tokenizer: ``embedded`` (SmolLM2), ``llama3.2`` or a local tokenizer directory.
            Linked from ``model.name_or_path`` by the CLI.
        max_length: longest example in tokens; longer responses are cut (the prompt is kept).
        batch_size: examples per micro-batch for training.
        eval_batch_size: examples per batch for validation and test.
        question: the instruction; ``{title}`` is replaced by the cleaned product title.
        template: prompt template with ``{instruction}`` and ``{input}``; the response follows it.
        input_text: the Alpaca "Input" field (empty in the seed).
        min_content_chars: drop descriptions shorter than this (1 = only empty ones, the seed).
        drop_title_only: drop descriptions that just repeat the title.
        drop_junk: drop descriptions such as "VHS Tape", "Book by", "Text: English".
        strip_boilerplate: remove Amazon's "--This text refers to … edition." notes.
        dedupe: drop repeated identical (title, description) pairs.
        val_fraction: share of products held out for validation (by title hash).
        test_fraction: share of products held out for the final test (by title hash).
        split_salt: change to draw a different product split.
        strict: stop at the first bad line instead of counting it as skipped.
        limit: read at most this many records.
        seed: shuffling seed (each epoch reshuffles with seed + epoch).
        layout: ``plain`` (the seed's batches), ``grouped`` (similar lengths batched together
            within random mega-batches: less padding) or ``packed`` (several examples per row of
            up to max_length tokens, attention kept inside each example: no padding to speak of,
            more examples per step). All three are seeded and resume exactly.
        share_prefix: with ``packed``, store the tokens every example of a batch starts with
            (the Alpaca preamble) once per row instead of once per example; a 4-D mask keeps
            each example's loss and gradients exactly its own. Fewer tokens to process (the
            preamble is ~20 % of an example on the real records); needs the model's ``sdpa``
            or ``eager`` attention (transformers' default), so ``backend: hf`` only.
        pack_length: with ``packed``, tokens per row (null: max_length). Smaller rows mean
            fewer examples per optimizer step (finer steps on a small data set) without
            truncating long examples: one longer than a row gets a row of its own.
        mega_batch: batches per length-grouping / packing chunk (bigger: tighter, less random).
        val_max_examples: validate on at most this many validation examples (a fixed, seeded
            sample), so validation of a huge file stays short; null: the whole split.
        shuffle: shuffle training batches.
        num_workers: DataLoader worker processes (0 is fastest here: a batch's examples are
            tokenised in well under a millisecond each).
        num_proc: processes that parse, clean and filter when the cache is built, and that
            count every example's tokens where all are needed first (a packed split of at most
            ``COUNT_ALL_UP_TO`` examples, evaluation splits, the data report; null: one per
            available core; 1: in the main process). Training batches tokenise on demand.
        pad_to_multiple_of: round padded lengths up (8 helps tensor cores on GPU).
        cache_dir: where the cleaned datasets go (default: ~/.cache/amzft/datasets).
        predict_split: the split whose products ``predict`` answers (``test``: held-out products).
        predict_limit: answer at most this many products in ``predict``.
    """

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str = "embedded",
        max_length: int = 2048,
        batch_size: int = 2,
        eval_batch_size: int = 8,
        question: str = SEED_QUESTION,
        template: str = ALPACA_TEMPLATE,
        input_text: str = "",
        min_content_chars: int = 1,
        drop_title_only: bool = True,
        drop_junk: bool = True,
        strip_boilerplate: bool = True,
        dedupe: bool = True,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_salt: str = "",
        strict: bool = False,
        limit: int | None = None,
        seed: int = 3407,
        shuffle: bool = True,
        layout: Literal["plain", "grouped", "packed"] = "plain",
        share_prefix: bool = False,
        pack_length: int | None = None,
        mega_batch: int = 64,
        val_max_examples: int | None = 2000,
        num_workers: int = 0,
        num_proc: int | None = None,
        pad_to_multiple_of: int = 1,
        cache_dir: str | None = None,
        predict_split: Literal["train", "validation", "test"] = "test",
        predict_limit: int | None = 32,
    ):
        super().__init__()
        problems = []
        if max_length < 8:
            problems.append(f"data.max_length must be >= 8, found {max_length}")
        if batch_size < 1 or eval_batch_size < 1:
            problems.append(f"data.batch_size and eval_batch_size must be >= 1, found {batch_size}, {eval_batch_size}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            problems.append(f"data.val_fraction + test_fraction must be in [0, 1), found {val_fraction} + {test_fraction}")
        if min_content_chars < 1:
            problems.append(f"data.min_content_chars must be >= 1, found {min_content_chars}")
        if num_proc is not None and num_proc < 1:
            problems.append(f"data.num_proc must be >= 1 or null, found {num_proc}")
        if mega_batch < 1 or (val_max_examples is not None and val_max_examples < 1):
            problems.append(f"data.mega_batch and val_max_examples must be >= 1, found {mega_batch}, {val_max_examples}")
        if limit is not None and limit < 1:
            problems.append(f"data.limit must be >= 1 or null, found {limit}")
        if share_prefix and layout != "packed":
            problems.append(f"data.share_prefix needs data.layout=packed (rows of several examples), found {layout!r}")
        if pack_length is not None and (layout != "packed" or pack_length < 8):
            problems.append(f"data.pack_length needs data.layout=packed and >= 8 tokens, found {pack_length} with {layout!r}")
        if problems:
            raise ConfigError("; ".join(problems))
        self.save_hyperparameters()
        self.settings = DataSettings(
            path=str(path) if path else str(shipped_sample()),
            max_length=max_length,
            filters=FilterSettings(min_content_chars, drop_title_only, drop_junk, strip_boilerplate, dedupe),
            prompt=PromptFormat(question, template, input_text),
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            split_salt=split_salt,
            strict=strict,
            limit=limit,
        )
        self.tokenizer_name = tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self.layout, self.mega_batch, self.val_max_examples = layout, mega_batch, val_max_examples
        self.share_prefix, self.pack_length = share_prefix, pack_length
        self.num_proc = num_proc
        self.pad_to_multiple_of, self.cache_dir = pad_to_multiple_of, cache_dir
        self.predict_split, self.predict_limit = predict_split, predict_limit
        self._tokenizer = None
        self.prepared: PreparedData | None = None
        self._train_sampler: ResumableBatchSampler | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def prepare_data(self) -> None:
        check_data_file(self.settings.path)
        # Runs on one process per node: builds the Arrow cache the other ranks then reopen.
        prepare(self.settings, self.tokenizer, self.cache_dir, self.num_proc)

    def setup(self, stage: str | None = None) -> None:
        if self.prepared is None:
            check_data_file(self.settings.path)  # before the (slow) tokenizer load
            self.prepared = prepare(self.settings, self.tokenizer, self.cache_dir, self.num_proc)
            stats = self.prepared.stats
            log.info(
                "data: %d read, %d kept (train %d / validation %d / test %d), skipped %s",
                stats.records_read, stats.kept, *(stats.split_sizes[s] for s in ("train", "validation", "test")),
                dict(stats.skipped),
            )

    def split(self, name: str):
        self.setup()
        return self.prepared.splits[name]

    def collator(self, train: bool = False) -> Collator:
        return Collator(self.tokenizer.pad_token_id, self.pad_to_multiple_of, share_prefix=train and self.share_prefix)

    def _accumulate(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.accumulate_grad_batches) if trainer is not None else 1

    def _batches_consumed(self) -> int:
        # The trainer's own count of training batches run this epoch: loaders fetch ahead, so
        # counting what the sampler yielded would over-count on resume.
        return batches_run_this_epoch(self.trainer)

    def _epoch(self) -> int:
        # The value Lightning itself passes to samplers' set_epoch at each epoch start.
        return epoch_number(self.trainer)

    def examples(self, name: str):
        """The split's examples, tokenised on demand (data.lazy.LazyExamples)."""
        self.setup()
        return self.prepared.examples(name)

    def train_dataloader(self):
        data = self.examples("train")
        if len(data) == 0:
            raise ConfigError(f"{self.settings.path}: the train split is empty (lower data.val_fraction / test_fraction)")
        trainer = getattr(self, "trainer", None)
        num_labels, lengths = self._train_counts(data)
        sampler = ResumableBatchSampler(
            num_labels,
            self.batch_size,
            self._accumulate(),
            self.seed,
            self.shuffle,
            lengths=lengths,
            layout=self.layout,
            max_length=self.pack_length or self.settings.max_length,
            mega_batch=self.mega_batch,
            # The sampler shards itself across DDP ranks (Lightning's DistributedSampler
            # injection is off: it cannot wrap a batch sampler that knows accumulation windows).
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
        if len(sampler) == 0:
            # Lightning would only warn ("No training batches") and stop without a checkpoint.
            raise ConfigError(f"{self.settings.path}: the train split ({len(data)} examples) makes no batch for each of "
                              f"{sampler.num_replicas} processes; use fewer processes, a smaller data.batch_size or more data")
        if trainer is not None:
            sampler.progress = self._batches_consumed
            sampler.epoch_source = self._epoch
        self._train_sampler = sampler
        return ResumableDataLoader(
            TokenizedDataset(data),
            batch_sampler=sampler,
            collate_fn=self.collator(train=True),
            num_workers=self.num_workers,
        )

    def _train_counts(self, data):
        """(label counts, lengths) for the train sampler. Lazy (tokenised as the epoch reaches
        them) wherever the batches do not need them all first: plain batches need no lengths;
        grouped ones sort one chunk at a time; packed ones pack one chunk at a time, but their
        epoch length comes from packing every example, so for a split of more than
        ``COUNT_ALL_UP_TO`` examples it is estimated from a sample instead (see
        ResumableBatchSampler), and training starts without counting the whole file. The
        choice depends on the split's size only, never on whether counts are cached, so every
        run of the same data has the same epochs."""
        if self.layout == "plain":
            return data.label_counts(), None
        if self.layout == "packed" and len(data) <= COUNT_ALL_UP_TO:
            return counted(data, self.num_proc)
        return data.label_counts(), data.token_lengths()

    def _eval_loader(self, name: str, max_examples: int | None = None):
        data = self.examples(name)
        if len(data) == 0:
            return []  # Lightning skips an empty loader list: no validation on this split
        if max_examples is not None and len(data) > max_examples:
            keep = np.random.default_rng(self.seed).choice(len(data), max_examples, replace=False)
            data = data.subset(np.sort(keep))
        num_labels, lengths = counted(data)
        trainer = getattr(self, "trainer", None)
        sampler = ResumableBatchSampler(
            num_labels,
            self.eval_batch_size,
            shuffle=False,
            lengths=lengths,
            layout="grouped",  # eval order does not matter: group by length, pad less
            mega_batch=10**9,
        )
        dataset = TokenizedDataset(data)
        if trainer is not None and trainer.world_size > 1:
            # Under DDP each rank scores a disjoint share, at least one batch (eval_shards);
            # the module sums loss and token counts across ranks.
            sampler = eval_shards(list(sampler), trainer.world_size)[trainer.global_rank]
            dataset = _EvalExamples(data)
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=self.collator(), num_workers=self.num_workers
        )

    def val_dataloader(self):
        return self._eval_loader("validation", self.val_max_examples)

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        """Prompts (not tokenised: generation tokenises and left-pads them) with references."""
        data = self.split(self.predict_split)
        n = len(data) if self.predict_limit is None else min(len(data), self.predict_limit)
        rows = data.select(range(n)).select_columns(["title", "content"])
        fmt = self.settings.prompt
        items = [{"title": t, "reference": c, "prompt": fmt.render(t)} for t, c in zip(rows["title"], rows["content"])]
        return torch.utils.data.DataLoader(
            items, batch_size=self.eval_batch_size, collate_fn=_columns
        )
