"""Scale: length-grouped and packed batches (seeded, resumable, no cross-contamination) and
DDP across 2 CPU processes matching one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from amzft.checkpoints.io import load_checkpoint_file
from amzft.checkpoints.locate import best_record
from amzft.cli.lightning_cli import cli_main
from amzft.data.batch_order import pack_first_fit
from amzft.data.build import DataSettings, prepare
from amzft.data.collate import Collator
from amzft.data.encode import IGNORE_INDEX
from amzft.data.module import AmazonTitlesDataModule, _EvalExamples, eval_shards
from amzft.data.sampler import ResumableBatchSampler
from amzft.data.settings import BatchOptions, HoldoutOptions
from amzft.data.split import assign_split
from amzft.errors import ConfigError, DataError
from amzft.model.module import LoraCausalLM
from amzft.training.callbacks import StopAtStep
from helpers import REAL_400, RecordSteps, fit_args, run_fit, tiny_records

TESTS = Path(__file__).resolve().parent


def _flat(batches):
    return sorted(i for b in batches for i in b)


@pytest.mark.parametrize("layout", ["plain", "grouped", "packed"])
def test_every_layout_covers_each_example_once_and_resumes_exactly(layout):
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 300, size=203)
    labels = lengths // 2
    def make():
        return ResumableBatchSampler(labels, batch_size=2, accumulate=4, seed=7, lengths=lengths,
                                     layout=layout, max_length=512, mega_batch=8)
    s = make()
    epoch0 = [list(b) for b in s]
    assert _flat(epoch0) == list(range(203))
    assert [list(b) for b in make()] == epoch0  # seeded
    s.set_epoch(1)
    assert [list(b) for b in s] != epoch0  # reshuffled
    s.progress = lambda: 9
    fresh = make()
    fresh.load_state_dict(s.state_dict())
    assert [list(b) for b in fresh] == [list(b) for b in s.batches(1)][9:]
    for w in range(0, len(epoch0), 4):  # window totals
        window = s.batches(0)[w : w + 4]
        assert all(b.window_label_tokens == sum(labels[i] for bb in window for i in bb) for b in window)


class _AskedLengths:
    """Lengths the sampler must ask for (as data.lazy.LazyCounts): records which it asked."""

    lazy = True

    def __init__(self, values):
        self.values, self.asked = np.asarray(values), set()

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, indices):
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        self.asked.update(indices.tolist())
        return self.values[indices]


@pytest.mark.parametrize("layout", ["grouped", "packed"])
def test_lazy_lengths_give_the_same_batches_and_are_asked_only_as_the_epoch_reaches_them(layout):
    """A split too big to count first (the whole trn.json): grouped / packed batches are made one
    chunk at a time, so the first batch needs only its chunk's lengths; the batches are those of
    known lengths; the epoch's length is exact for grouped and estimated from a sample for packed."""
    rng = np.random.default_rng(3)
    values = rng.integers(20, 300, size=5000)
    kw = dict(batch_size=2, accumulate=2, seed=7, layout=layout, max_length=512, mega_batch=16)
    eager = ResumableBatchSampler(values // 2, lengths=values, **kw)
    lengths = _AskedLengths(values)
    lazy = ResumableBatchSampler(values // 2, lengths=lengths, **kw)
    first = next(iter(lazy))
    chunk = 2 * 16 * (8 if layout == "packed" else 1)
    assert len(lengths.asked) == chunk and set(first) <= lengths.asked
    assert [(list(b), b.rows, b.window_label_tokens) for b in lazy] == [
        (list(b), b.rows, b.window_label_tokens) for b in eager.batches(0)]
    true_length = len(eager.batches(0))
    if layout == "grouped":
        assert len(lazy) == true_length
    else:
        assert lazy.batches(0) and abs(len(lazy) - true_length) <= 0.03 * true_length, (len(lazy), true_length)
        estimate = ResumableBatchSampler(values // 2, lengths=_AskedLengths(values), **kw)
        assert len(estimate) == len(lazy)  # a pure function of the data and the seed


@pytest.mark.parametrize("n", [1, 7, 64, 65, 203])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_plain_and_grouped_epoch_lengths_are_counted_without_the_lengths(n, world, drop_last):
    """len() (what Lightning ends epochs by) equals the batches an epoch yields."""
    lengths = np.random.default_rng(n).integers(5, 50, size=n)
    for layout in ("plain", "grouped"):
        kw = dict(batch_size=3, accumulate=2, seed=1, layout=layout, mega_batch=4, num_replicas=world,
                  drop_last=drop_last)
        made = ResumableBatchSampler(lengths, lengths=lengths, **kw).batches(0)
        assert len(ResumableBatchSampler(lengths, lengths=_AskedLengths(lengths), **kw)) == len(made), layout
        assert all(len(b) == 3 for b in made) or not drop_last


def test_a_big_packed_split_starts_without_counting_every_example(write_jsonl, tiny_model_dir, monkeypatch):
    """Above data.module.COUNT_ALL_UP_TO examples, the packed train loader tokenises a sample
    (the epoch length estimate) and the chunks it reaches, not the whole split; the estimate is
    the same whether or not the counts are already known (a warm cache)."""
    monkeypatch.setattr("amzft.data.module.COUNT_ALL_UP_TO", 50)
    monkeypatch.setattr("amzft.data.batch_order.ESTIMATE_SAMPLE", 40)
    dm = AmazonTitlesDataModule(write_jsonl(tiny_records(400)), tokenizer=str(tiny_model_dir), max_length=160,
                                batches=BatchOptions(layout="packed", pack_length=160, mega_batch=2), batch_size=1,
                                holdout=HoldoutOptions(val_fraction=0.05, test_fraction=0.05))
    dm.setup("fit")
    examples = dm.examples("train")
    assert len(examples) > 200
    loader = dm.train_dataloader()
    estimated = len(loader)
    next(iter(loader))
    counted = int((examples.lengths >= 0).sum())
    assert 0 < counted <= 40 + 2 * 2 * 8, counted  # the sample and the first packing chunk
    examples.ensure_counts()
    assert len(dm.train_dataloader()) == estimated
    true_length = len(ResumableBatchSampler(examples.num_labels, 1, lengths=examples.lengths, seed=dm.batches.seed,
                                            layout="packed", max_length=160, mega_batch=2))
    assert abs(estimated - true_length) <= max(2, 0.1 * true_length), (estimated, true_length)


def _padding_efficiency(sampler, lengths):
    real = padded = 0
    for b in sampler:
        rows = b.rows or [1] * len(b)
        sizes, at = [], 0
        for n in rows:
            sizes.append(sum(lengths[i] for i in list(b)[at : at + n]))
            at += n
        real += sum(sizes)
        padded += max(sizes) * len(sizes)
    return real / padded


def test_grouping_and_packing_cut_padding():
    lengths = np.random.default_rng(1).integers(30, 600, size=2000)
    kw = dict(batch_size=4, seed=3, lengths=lengths, max_length=1024)
    plain = _padding_efficiency(ResumableBatchSampler(lengths, layout="plain", **kw), lengths)
    grouped = _padding_efficiency(ResumableBatchSampler(lengths, layout="grouped", **kw), lengths)
    packed = _padding_efficiency(ResumableBatchSampler(lengths, layout="packed", **kw), lengths)
    assert plain < 0.75 < grouped and packed > 0.9, (plain, grouped, packed)


def test_first_fit_packing_respects_capacity():
    lengths = np.random.default_rng(2).integers(1, 100, size=500)
    rows = pack_first_fit(np.arange(500), lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert len(rows) <= int(np.ceil(lengths.sum() / 128 * 1.1)) + 1  # within 10 % of perfect


@pytest.mark.parametrize("layout", ["plain", "grouped", "packed"])
def test_ddp_shards_are_the_single_process_batches(layout):
    """2 ranks x batch 1 see, step by step, what 1 process x batch 2 sees (plain), and the
    window totals are global; for every layout the ranks are disjoint and equally long."""
    lengths = np.random.default_rng(4).integers(20, 200, size=61)
    kw = dict(accumulate=2, seed=5, lengths=lengths, layout=layout, max_length=400)
    ranks = [ResumableBatchSampler(lengths, batch_size=1, num_replicas=2, rank=r, **kw) for r in (0, 1)]
    shards = [list(r) for r in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0])
    assert not set(_flat(shards[0])) & set(_flat(shards[1]))
    for a, b in zip(*shards):
        assert a.window_label_tokens == b.window_label_tokens
    if layout == "plain":
        single = list(ResumableBatchSampler(lengths, batch_size=2, **kw))
        assert [sorted([*a, *b]) for a, b in zip(*shards)] == [sorted(s) for s in single[: len(shards[0])]]
        assert [a.window_label_tokens for a in shards[0]] == [s.window_label_tokens for s in single[: len(shards[0])]]


def _per_example_losses(model, batch, spans):
    """Sum of token CE over each example's label positions; spans: (row, start, end) per example."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none",
                         ignore_index=IGNORE_INDEX)
    # ce[t] scores token t + 1; an example's first token is an unlabelled prompt token
    return torch.stack([ce[row, max(start - 1, 0) : end - 1].sum() for row, start, end in spans])


def test_packed_batch_gives_the_same_per_example_losses(tiny_model_dir, llama_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(100, 5000, size=n).tolist() for n in (23, 40, 17, 31, 9)]
    prompts = [6, 11, 5, 8, 3]
    collate = Collator(llama_tokenizer.pad_token_id)
    plain = collate({"input_ids": seqs, "prompt_len": prompts})
    plain_spans = [(r, 0, len(s)) for r, s in enumerate(seqs)]
    rows = [3, 2]  # row 0: examples 0-2, row 1: examples 3-4
    packed = collate({"input_ids": seqs, "prompt_len": prompts, "rows": rows})
    assert "attention_mask" not in packed and packed["input_ids"].shape == (2, 80)
    assert packed["position_ids"][0, :26].tolist() == [*range(23), 0, 1, 2]
    assert int(packed["label_tokens"]) == int(plain["label_tokens"])
    packed_spans, at = [], {0: 0, 1: 0}
    for i, row in enumerate([0, 0, 0, 1, 1]):
        packed_spans.append((row, at[row], at[row] + len(seqs[i])))
        at[row] += len(seqs[i])
    expected = _per_example_losses(model, plain, plain_spans)
    got = _per_example_losses(model, packed, packed_spans)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Without restarting position ids (plain concatenation, full causal attention) the later
    # examples see the earlier ones: the check above would fail.
    leaky = {**packed, "position_ids": None, "attention_mask": torch.ones_like(packed["input_ids"])}
    assert not torch.allclose(_per_example_losses(model, leaky, packed_spans)[1:3], expected[1:3], rtol=1e-3)


def test_shared_prefix_packing_gives_each_example_its_own_loss_and_gradients(tiny_model_dir, llama_tokenizer):
    """data.batches.share_prefix: the common preamble stored once per row, a 4-D mask, position ids
    continuing from it: per-example losses, the batch's loss sum and the LoRA gradients are
    those of the unpacked batch, with fewer tokens processed."""
    rng = np.random.default_rng(1)
    preamble = rng.integers(100, 5000, size=7).tolist()
    seqs = [preamble + rng.integers(100, 5000, size=n).tolist() for n in (16, 33, 10, 24, 12)]
    prompts = [12, 9, 10, 15, 11]  # the shared prefix is cut at min(prompt) - 1 = 8 > 7: stays 7
    plain = Collator(llama_tokenizer.pad_token_id)({"input_ids": seqs, "prompt_len": prompts})
    shared = Collator(llama_tokenizer.pad_token_id, share_prefix=True)(
        {"input_ids": seqs, "prompt_len": prompts, "rows": [3, 2]})
    assert Collator.shared_prefix_length(seqs, prompts) == 7
    assert shared["input_ids"].shape == (2, 7 + 16 + 33 + 10) and shared["attention_mask"].shape == (2, 1, 66, 66)
    assert shared["input_ids"][0, :7].tolist() == preamble and shared["position_ids"][0, 7:10].tolist() == [7, 8, 9]
    assert int(shared["real_tokens"]) == int(plain["real_tokens"]) == sum(map(len, seqs))
    assert int(shared["input_tokens"]) == sum(map(len, seqs)) - 3 * 7  # 5 examples, 2 rows: 3 preambles saved
    assert int(shared["label_tokens"]) == int(plain["label_tokens"])
    mask = shared["attention_mask"][0, 0]
    assert mask[30, :7].all() and not mask[30, 7:23].any() and mask[30, 23:31].all()  # prefix + own example only

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    spans, at = [], {0: 7, 1: 7}
    for i, row in enumerate([0, 0, 0, 1, 1]):
        spans.append((row, at[row], at[row] + len(seqs[i]) - 7))
        at[row] += len(seqs[i]) - 7
    expected = _per_example_losses(model, plain, [(r, 0, len(s)) for r, s in enumerate(seqs)])
    torch.testing.assert_close(_per_example_losses(model, shared, spans), expected, rtol=1e-5, atol=1e-5)
    # Control: a plain causal mask lets examples see the ones before them in the row; the tiny
    # random model's attention is nearly uniform, so the effect is small, yet 100x the tolerance.
    leaky = {**shared, "attention_mask": torch.ones_like(shared["input_ids"])}
    assert (_per_example_losses(model, leaky, spans) - expected)[1:3].abs().max() > 1e-3

    module = LoraCausalLM(name_or_path=str(tiny_model_dir))
    module.configure_model()
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    sums, grads = [], []
    for batch in (plain, shared):
        module.model.zero_grad(set_to_none=True)
        loss_sum, _ = module.token_loss_sum(batch)
        loss_sum.backward()
        sums.append(loss_sum.detach())
        grads.append({k: p.grad.clone() for k, p in module.model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(sums[1], sums[0], rtol=1e-5, atol=1e-5)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-5)
    # eager attention adds the mask to the scores: amzft hands it an additive mask instead
    module.model.get_base_model().set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(module.token_loss_sum(shared)[0], sums[0], rtol=1e-5, atol=1e-5)


def test_share_prefix_needs_packed_rows():
    with pytest.raises(ConfigError, match="data.batches.share_prefix needs data.batches.layout=packed"):
        AmazonTitlesDataModule(batches=BatchOptions(layout="grouped", share_prefix=True))
    with pytest.raises(ConfigError, match="data.batches.pack_length needs data.batches.layout=packed"):
        AmazonTitlesDataModule(batches=BatchOptions(layout="plain", pack_length=512))


def test_pack_length_sets_the_row_capacity(write_jsonl, tiny_model_dir):
    """Rows hold at most pack_length tokens (max_length still only truncates), so a small data
    set gets several optimizer steps per epoch."""
    lengths = {}
    for pack_length in (None, 200):
        dm = AmazonTitlesDataModule(write_jsonl(tiny_records(40)), tokenizer=str(tiny_model_dir), max_length=1024,
                                    batch_size=1, batches=BatchOptions(layout="packed", pack_length=pack_length))
        dm.setup("fit")
        batches = dm.train_dataloader().batch_sampler.batches(0)
        data = dm.split("train")
        sizes = [sum(len(data[int(i)]["input_ids"]) for i in b) for b in batches]
        lengths[pack_length] = (len(batches), max(sizes))
    assert lengths[200][1] <= 200 < lengths[None][1] and lengths[200][0] > lengths[None][0], lengths


@pytest.mark.parametrize("layout", ["grouped", "packed", "packed+share", "packed+share+rows", "packed+share+rows+lazy"])
def test_fit_runs_and_resumes_exactly_with_each_layout(layout, tiny_model_dir, write_jsonl, tmp_path, monkeypatch):
    data = write_jsonl(tiny_records(40))
    if layout.endswith("+lazy"):  # packed as the epoch reaches each chunk, its length estimated (a big split)
        monkeypatch.setattr("amzft.data.module.COUNT_ALL_UP_TO", 0)
        layout = layout.removesuffix("+lazy")
    layout, _, share = layout.partition("+")
    common = ("--trainer.max_steps", "6", "--data.batches.layout", layout, "--data.max_length", "160", "--data.batches.mega_batch", "4",
              "--data.batches.share_prefix", str(bool(share)).lower())
    if share.endswith("rows"):  # rows shorter than max_length (data.batches.pack_length): the shipped CPU config's layout
        common += ("--data.batches.pack_length", "120")
    straight = RecordSteps()
    a = run_fit(fit_args(tiny_model_dir, data, tmp_path / "a", *common), straight)
    first = RecordSteps()
    run_fit(fit_args(tiny_model_dir, data, tmp_path / "b", *common), first, StopAtStep(3))
    resumed = RecordSteps()
    b = run_fit(fit_args(tiny_model_dir, data, tmp_path / "b", *common, "--ckpt_path", "last"), resumed,
                resumed_from_last=True)
    assert len(straight.losses) == 6 and resumed.losses == straight.losses[3:]
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert 0.5 < a.trainer.callback_metrics["train/padding_efficiency"] <= 1


def _start_fit(tiny_model_dir, data, tmp_path, name, *extra):
    """Start ``python -m amzft fit`` (the tests' shrunk cpu.yaml, 4 steps) in a fresh process, as
    a user runs it (Lightning's DDP launcher starts the other ranks as such processes), its
    output into a file (runs started side by side never block on a full pipe)."""
    losses = tmp_path / f"{name}.jsonl"
    args = fit_args(tiny_model_dir, data, tmp_path / name, "--trainer.max_steps", "4",
                    "--model.optim.optimizer", "adamw", "--trainer.default_root_dir", str(tmp_path / name / "logs"),
                    "--trainer.callbacks+=" + json.dumps({"class_path": "fault_helpers.RecordLosses",
                                                          "init_args": {"path": str(losses)}}), *extra)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    with (tmp_path / f"{name}.out").open("w") as out:
        return name, subprocess.Popen([sys.executable, "-m", "amzft", *args], stdout=out, stderr=subprocess.STDOUT,
                                      text=True, env=env)


def _finished(started, tmp_path):
    """A started fit, once done: per-step losses, last.ckpt's adapter, the output and the run's
    log folder."""
    name, proc = started
    try:
        proc.wait(timeout=600)
    finally:
        proc.kill()  # a no-op once it has exited
    output = (tmp_path / f"{name}.out").read_text()
    assert proc.returncode == 0, output[-6000:]
    rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    logs = tmp_path / name / "logs"
    adapter = load_checkpoint_file(next(logs.rglob("last.ckpt")))["state_dict"]
    return [r["loss"] for r in rows], adapter, output, logs


DDP_2_CPU = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")


@pytest.mark.e2e
@pytest.mark.xdist_group("ddp")  # one DDP pair at a time under xdist: they would share the cores and ports
def test_ddp_two_cpu_processes_match_one_process(tiny_model_dir, write_jsonl, tmp_path):
    """`trainer.strategy: ddp` on 2 gloo processes x batch 1 == 1 process x batch 2: same
    per-step losses and adapter (float tolerance: the all-reduce sums in another order), through
    the epoch's short last window (30 training products: windows of 4, 4, 4 and 3 batches), and
    the same val/loss at the last step from fewer validation batches than ranks (8 validation
    products, one batch of 8): before, rank 1 had no validation batch and Lightning stopped the
    run before its first step ("`DataLoader` within local rank has zero length"). The two runs
    go side by side."""
    records = tiny_records(38)
    assert [assign_split(r["title"], 0.2, 0) for r in records].count("validation") == 8  # and 30 train
    data = write_jsonl(records)
    # 8 validation products rank checkpoints here (best.min_products 1): the best file is compared
    split = ("--data.holdout.val_fraction", "0.2", "--best.min_products", "1")
    started = [_start_fit(tiny_model_dir, data, tmp_path, "single", "--data.batch_size", "2", *split),
               _start_fit(tiny_model_dir, data, tmp_path, "ddp", "--data.batch_size", "1", *split, *DDP_2_CPU)]
    (single, adapter1, _, single_logs), (ddp, adapter2, log, ddp_logs) = (_finished(s, tmp_path) for s in started)
    assert "distributed_backend=gloo" in log and "All distributed processes registered" in log
    assert len(single) == len(ddp) == 4
    np.testing.assert_allclose(ddp, single, rtol=1e-5)
    for k in adapter1:
        torch.testing.assert_close(adapter2[k], adapter1[k], rtol=1e-4, atol=1e-6)
    best = [best_record(next(logs.rglob("best-*.ckpt"))) for logs in (single_logs, ddp_logs)]
    assert [r[:2] for r in best] == [(4, "val/loss")] * 2  # the validation of the last step
    np.testing.assert_allclose(best[1][2], best[0][2], rtol=1e-5)


def _filler(batch) -> bool:
    return getattr(batch, "filler", False)


class _Examples:
    """Stands for data.lazy.LazyExamples: example i has 10 + i tokens, the last 3 + i % 4 of them
    its response."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def encode(self, indices):
        return [SimpleNamespace(input_ids=list(range(1, 11 + i)), prompt_len=7 - i % 4 + i) for i in indices]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_give_every_rank_a_batch_and_score_each_example_once(n, world):
    """Evaluation batches of 4 (so 1-3 batches here) on 1-3 ranks: every rank has a batch
    (Lightning stops a run where one rank has none and another has some), every example is
    scored on exactly one rank, and a filler batch (a rank without an example of its own)
    collates to no labels."""
    lengths = 10 + np.arange(n)
    labels = 3 + np.arange(n) % 4
    batches = list(ResumableBatchSampler(labels, 4, shuffle=False, lengths=lengths, layout="grouped",
                                         mega_batch=10**9))
    shards = eval_shards(batches, world)
    assert len(shards) == world and all(len(shard) >= 1 for shard in shards)
    real = [b for shard in shards for b in shard if not _filler(b)]
    assert sorted(i for b in real for i in b) == list(range(n))  # each example once, across the ranks
    assert sum(_filler(b) for shard in shards for b in shard) == max(0, world - n)
    if world == 1 or len(batches) >= world:  # enough batches: the single-process batches, round-robin
        assert [b for r in range(world) for b in shards[r]] == [b for r in range(world) for b in batches[r::world]]
    else:  # re-cut: no rank's batch is bigger than the batch size, none empty
        assert all(1 <= len(b) <= 4 for shard in shards for b in shard)
    examples, collate = _EvalExamples(_Examples(n)), Collator(pad_id=0)
    scored = 0
    for shard in shards:
        for b in torch.utils.data.DataLoader(examples, batch_sampler=shard, collate_fn=collate):
            assert int(b["label_tokens"]) == int((b["labels"] != IGNORE_INDEX).sum())
            scored += int(b["label_tokens"])
    assert scored == labels.sum()  # fillers add no label token


def test_ddp_eval_loaders_give_every_rank_a_batch_and_the_single_process_sums(write_jsonl, tiny_model_dir):
    """A split of 1 validation and 5 test examples (one batch of 8) on 2 and 3 ranks: each
    rank's validation and test loader has a batch, a filler batch scores 0 loss over 0 label
    tokens (no NaN), and the ranks' loss and token sums, as the module adds them up, are the
    single-process ones."""
    dm = AmazonTitlesDataModule(write_jsonl(tiny_records(30)), tokenizer=str(tiny_model_dir),
                                holdout=HoldoutOptions(val_fraction=0.05, test_fraction=0.2))
    dm.setup("fit")
    assert (len(dm.split("validation")), len(dm.split("test"))) == (1, 5)
    module = LoraCausalLM(name_or_path=str(tiny_model_dir))
    module.configure_model()
    module.eval()

    def sums(loaders) -> list:
        for loader in loaders:
            for batch in loader:
                if int(batch["label_tokens"]) == 0:  # a filler: were it run, 0 loss over 0 tokens
                    loss_sum, n = module.token_loss_sum(batch)
                    assert (float(loss_sum), n) == (0.0, 0)
                module._eval_step(batch, "check")
        return module._eval_sums.pop("check", [0.0, 0])

    with torch.no_grad():
        for name in ("validation", "test"):
            loader = dm.val_dataloader if name == "validation" else dm.test_dataloader
            dm.trainer = None
            one = sums([loader()])
            assert one[1] > 0
            for world in (2, 3):
                ranks = []
                for rank in range(world):
                    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
                    ranks.append(loader())
                assert all(len(r) >= 1 for r in ranks), (name, world)
                got = sums(ranks)
                assert got[1] == one[1] and got[0] == pytest.approx(one[0], rel=1e-5), (name, world)


def test_epoch_based_run_and_validation_sample(tiny_model_dir, write_jsonl, tmp_path):
    data = write_jsonl(tiny_records(40))
    cli = cli_main(fit_args(tiny_model_dir, data, tmp_path, "--trainer.max_steps", "-1", "--trainer.max_epochs", "2",
                            "--data.holdout.val_fraction", "0.3", "--data.holdout.val_max_examples", "3",
                            "--trainer.check_val_every_n_epoch", "1"), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train = len(cli.datamodule.split("train"))
    batches = -(-train // 2)  # batches of 2 (ceiling division), the last one short
    per_epoch = -(-batches // 4)  # windows of 4
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 2 * per_epoch
    assert len(cli.datamodule.split("validation")) > 3
    val = cli.datamodule.val_dataloader()
    assert sum(len(b) for b in val.batch_sampler) == 3  # a fixed sample of 3, not the whole split
    assert "val/loss" in cli.trainer.callback_metrics


def _rows(prepared):
    return {name: [(r["line"], r["input_ids"], r["prompt_len"], r["title"]) for r in data]
            for name, data in prepared.splits.items()}


def test_parallel_build_gives_the_same_examples_and_counts(write_jsonl, llama_tokenizer, tmp_path):
    records = [*tiny_records(30), *tiny_records(5), b"{broken", b'{"title": 3, "content": "x"}', b"\xff\xfe",
               {"title": "Empty", "content": ""}, {"title": "Same", "content": "Same"}, {"title": "A", "content": "VHS Tape"}]
    files = [write_jsonl(records)] + ([REAL_400] if REAL_400.is_file() else [])
    for path in files:
        settings = DataSettings(path=str(path), val_fraction=0.2, test_fraction=0.2)
        serial = prepare(settings, llama_tokenizer, tmp_path / "serial", num_proc=1)
        parallel = prepare(settings, llama_tokenizer, tmp_path / "parallel", num_proc=2)
        assert _rows(serial) == _rows(parallel)
        a, b = serial.stats.to_dict(), parallel.stats.to_dict()
        assert a == b, (a, b)
    assert serial.stats.skipped  # the synthetic file exercised the skips (last file may be real)


def test_parallel_build_strict_names_the_first_bad_line(write_jsonl, llama_tokenizer, tmp_path):
    path = write_jsonl([*tiny_records(5000), b"{broken", *tiny_records(3)])
    with pytest.raises(DataError, match=r"trn.json:5001: malformed JSON"):
        prepare(DataSettings(path=str(path), strict=True), llama_tokenizer, tmp_path / "c", num_proc=2)


def test_a_train_split_too_small_for_every_process_is_one_line(write_jsonl, tiny_model_dir):
    """3 short examples pack into one row: 2 processes would each get none, and Lightning would
    stop without a step or a checkpoint, saying only "No training batches"."""
    dm = AmazonTitlesDataModule(write_jsonl(tiny_records(3)), tokenizer=str(tiny_model_dir), max_length=512,
                                holdout=HoldoutOptions(val_fraction=0, test_fraction=0),
                                batches=BatchOptions(layout="packed"))
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, accumulate_grad_batches=1)
    with pytest.raises(ConfigError, match=r"the train split \(3 examples\) makes no batch for each of 2 processes"):
        dm.train_dataloader()
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, accumulate_grad_batches=1)
    assert len(dm.train_dataloader()) == 1
