import json

import numpy as np
import pytest

from amzft.data.build import DataSettings, prepare
from amzft.data.collate import Collator
from amzft.data.encode import IGNORE_INDEX, PromptEncoder, encode_texts, join_example
from amzft.data.prompt import PromptFormat
from amzft.data.sampler import ResumableBatchSampler
from amzft.data.split import assign_split
from amzft.errors import DataError
from amzft.sources import load_tokenizer
from helpers import REAL_400, SHARED_DATA, needs_real_data


def _records(n):
    return [{"title": f"Product {i}", "content": f"Description number {i}. " * (1 + i % 7)} for i in range(n)]


def test_labels_mask_prompt_and_keep_response_plus_eos(write_jsonl, llama_tokenizer, cache_dir):
    path = write_jsonl([{"title": "Blue Mug", "content": "A &quot;blue&quot; mug for tea."}])
    data = prepare(DataSettings(path=str(path), val_fraction=0, test_fraction=0), llama_tokenizer, cache_dir)
    row = data.splits["train"][0]
    tok = llama_tokenizer
    prompt_ids = tok(PromptFormat().render("Blue Mug"))["input_ids"]
    response_ids = tok('A "blue" mug for tea.', add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt_ids + response_ids + [tok.eos_token_id]
    assert row["prompt_len"] == len(prompt_ids) and row["num_labels"] == len(response_ids) + 1
    batch = Collator(tok.pad_token_id)({"input_ids": [row["input_ids"]], "prompt_len": [row["prompt_len"]]})
    labels = batch["labels"][0].tolist()
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids):] == response_ids + [tok.eos_token_id]


def test_truncation_keeps_prompt_drops_eos_and_never_leaves_all_masked():
    assert join_example([1, 2, 3], [4, 5], 9, max_length=6) == ([1, 2, 3, 4, 5, 9], 3, False)
    assert join_example([1, 2, 3], [4, 5, 6], 9, max_length=5) == ([1, 2, 3, 4, 5], 3, True)
    assert join_example([1, 2, 3], [4, 5], 9, max_length=3) is None  # no room for any response
    assert join_example([1, 2, 3], [], 9, max_length=10) is None


def test_prompt_too_long_is_counted(write_jsonl, llama_tokenizer, cache_dir):
    path = write_jsonl([{"title": "word " * 80, "content": "ok content"}, {"title": "Mug", "content": "A mug " * 100}])
    data = prepare(DataSettings(path=str(path), max_length=64, val_fraction=0, test_fraction=0), llama_tokenizer, cache_dir)
    assert data.stats.skipped == {"prompt_too_long": 1} and data.stats.skipped_lines["prompt_too_long"] == [1]
    train = data.examples("train")
    train.ensure_counts()  # a cut response is known once its example is tokenised
    assert data.stats.kept == 1 and train.truncated.tolist() == [1]
    assert len(data.splits["train"][0]["input_ids"]) == 64


def test_nothing_usable_is_a_clear_error(write_jsonl, llama_tokenizer, cache_dir):
    path = write_jsonl([{"title": "A", "content": ""}, {"title": "B", "content": " "}])
    with pytest.raises(DataError, match=r"no usable records \(2 read; skipped: empty_content=2\)"):
        prepare(DataSettings(path=str(path)), llama_tokenizer, cache_dir)


def test_split_is_by_product_deterministic_and_disjoint(write_jsonl, llama_tokenizer, cache_dir):
    recs = _records(300)
    recs += [{"title": r["title"].upper(), "content": r["content"] + " (again)"} for r in recs[:100]]
    path = write_jsonl(recs)
    data = prepare(DataSettings(path=str(path), val_fraction=0.2, test_fraction=0.2), llama_tokenizer, cache_dir)
    keys = {name: {t.casefold() for t in ds["title"]} for name, ds in data.splits.items()}
    assert not (keys["train"] & keys["validation"]) and not (keys["train"] & keys["test"])
    assert not (keys["validation"] & keys["test"])
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sum(sizes.values()) == 400 and all(60 <= sizes[s] <= 110 for s in ("validation", "test"))
    # order-independent: a title always lands in the same split
    assert assign_split("Mog's Kittens", 0.2, 0.2) == assign_split("  mog's   KITTENS ", 0.2, 0.2)


def test_cache_is_reused_and_invalidated(write_jsonl, llama_tokenizer, cache_dir):
    path = write_jsonl(_records(50))
    first = prepare(DataSettings(path=str(path)), llama_tokenizer, cache_dir)
    again = prepare(DataSettings(path=str(path)), llama_tokenizer, cache_dir)
    assert not first.from_cache and again.from_cache and again.directory == first.directory
    other = prepare(DataSettings(path=str(path), max_length=80), llama_tokenizer, cache_dir)
    assert other.directory != first.directory
    with path.open("a") as f:
        f.write(json.dumps({"title": "New", "content": "A new record."}) + "\n")
    changed = prepare(DataSettings(path=str(path)), llama_tokenizer, cache_dir)
    assert not changed.from_cache and changed.stats.kept == 51
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".build-")]  # no leftovers


def test_collator_pads_right_with_lengths_mask_even_when_pad_is_eos():
    eos = 7
    batch = Collator(pad_id=eos)({"input_ids": [[1, 2, 3, eos], [1, 2, eos]], "prompt_len": [2, 1]})
    assert batch["input_ids"].tolist() == [[1, 2, 3, eos], [1, 2, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 3, eos], [-100, 2, eos, -100]]
    assert batch["label_tokens"].item() == 4 and batch["window_label_tokens"].item() == 4
    padded = Collator(pad_id=0, pad_to_multiple_of=8)({"input_ids": [[1, 2, 3]], "prompt_len": [1]})
    assert padded["input_ids"].shape == (1, 8)


def test_sampler_is_seeded_windowed_and_resumable():
    counts = np.arange(1, 24)  # 23 examples -> 12 batches of 2 -> windows of 4: 4,4,4
    s = ResumableBatchSampler(counts, batch_size=2, accumulate=4, seed=5)
    epoch0 = list(s)
    assert sorted(i for b in epoch0 for i in b) == list(range(23)) and len(epoch0) == len(s) == 12
    assert [list(b) for b in ResumableBatchSampler(counts, 2, 4, seed=5)] == [list(b) for b in epoch0]
    for w in range(3):
        window = epoch0[4 * w : 4 * w + 4]
        assert all(b.window_label_tokens == sum(counts[i] for bb in window for i in bb) for b in window)
    s.set_epoch(1)
    assert [list(b) for b in s] != [list(b) for b in epoch0]
    # resume after 5 batches of epoch 1: the rest is exactly what an uninterrupted run sees
    s.progress = lambda: 5
    state = s.state_dict()
    fresh = ResumableBatchSampler(counts, 2, 4, seed=5)
    fresh.load_state_dict(state)
    full = [list(b) for b in s.batches(1)]
    assert [list(b) for b in fresh] == full[5:]
    assert [list(b) for b in fresh] == full  # the skip applies once
    # saved at the end of epoch 1: that epoch yields nothing more, the next one is whole
    s.progress = lambda: 12
    fresh = ResumableBatchSampler(counts, 2, 4, seed=5)
    fresh.load_state_dict(s.state_dict())
    assert list(fresh) == []
    fresh.set_epoch(2)
    assert [list(b) for b in fresh] == [list(b) for b in s.batches(2)]
    # under a trainer, the epoch comes from its counter (Lightning never calls a batch
    # sampler's set_epoch): two epochs, two orders
    epochs = iter([0, 1])
    s = ResumableBatchSampler(counts, 2, 4, seed=5)
    s.epoch_source = lambda: next(epochs)
    assert [list(b) for b in s] == [list(b) for b in epoch0] and [list(b) for b in s] == [list(b) for b in s.batches(1)]


@needs_real_data()
def test_every_real_record_keeps_labels_and_loses_its_entities(llama_tokenizer, cache_dir):
    for path in sorted(SHARED_DATA.glob("*.jsonl")):
        data = prepare(DataSettings(path=str(path), val_fraction=0.1, test_fraction=0.1), llama_tokenizer, cache_dir)
        assert data.stats.kept > 0
        for ds in data.splits.values():
            for row in ds:
                assert row["num_labels"] >= 1 and row["prompt_len"] < len(row["input_ids"])
                for text in (row["title"], row["content"]):
                    assert "&#" not in text and "&amp;" not in text and "&quot;" not in text
                    assert "  " not in text and "This text refers to" not in text


@needs_real_data()
def test_real_file_report_counts(llama_tokenizer, cache_dir):
    data = prepare(DataSettings(path=str(REAL_400)), llama_tokenizer, cache_dir)
    s = data.stats
    assert s.records_read == 400 and s.kept + sum(s.skipped.values()) == 400
    assert s.skipped["content_equals_title"] == 1 and s.skipped["junk_content"] >= 4


# The embedded model's tokenizer comes with the model, de-quantised on first use into the test
# run's own cache (~30 s): slow, with the other tests of the embedded model.
@pytest.mark.parametrize("tokenizer_name", ["llama3.2", pytest.param("embedded", marks=pytest.mark.slow)])
def test_prompt_encoder_matches_whole_prompt_tokenisation(tokenizer_name):
    tok = load_tokenizer(tokenizer_name)
    titles = ["Mog's Kittens", "HMS \"Ulysses\"", "123 Go!", "  spaced", "?odd", "Caf\u00e9 Songs", "x" * 300]
    enc = PromptEncoder(tok, PromptFormat())
    whole = encode_texts(tok, [PromptFormat().render(t) for t in titles], True)
    assert enc(titles) == whole and enc.split_ok
    # a template whose head would tokenise differently on its own falls back to whole prompts
    odd = PromptFormat(template="Say {instruction}{input}:")
    enc2 = PromptEncoder(tok, odd)
    assert enc2(titles) == encode_texts(tok, [odd.render(t) for t in titles], True)


def test_plain_batches_tokenise_only_their_window_and_match_counting_all(write_jsonl, llama_tokenizer, cache_dir):
    path = write_jsonl(_records(60))
    data = prepare(DataSettings(path=str(path), val_fraction=0, test_fraction=0), llama_tokenizer, cache_dir)
    examples = data.examples("train")
    lazy = ResumableBatchSampler(examples.label_counts(), batch_size=2, accumulate=3, seed=5)
    first = next(iter(lazy))
    assert (examples.lengths >= 0).sum() == 6  # the first window's 3 batches of 2, nothing more
    examples.ensure_counts()
    eager = ResumableBatchSampler(examples.num_labels, batch_size=2, accumulate=3, seed=5)
    assert [(list(b), b.window_label_tokens) for b in lazy] == [(list(b), b.window_label_tokens) for b in eager.batches(0)]
    assert first.window_label_tokens == eager.batches(0)[0].window_label_tokens
    row = data.splits["train"][int(first[0])]  # rows read from the split come tokenised the same way
    assert row["input_ids"] == examples.encode([first[0]])[0].input_ids
    reopened = prepare(DataSettings(path=str(path), val_fraction=0, test_fraction=0), llama_tokenizer, cache_dir)
    assert (reopened.examples("train").num_labels == examples.num_labels).all()  # counts kept beside the cache


def test_counting_in_worker_processes_matches_one_process(write_jsonl, llama_tokenizer, cache_dir, monkeypatch):
    from amzft.data import lazy  # noqa: PLC0415 - its chunk sizes are shrunk for this test

    monkeypatch.setattr(lazy, "COUNT_CHUNK", 7)
    monkeypatch.setattr(lazy, "PARALLEL_FROM", 0)
    path = write_jsonl(_records(60))
    settings = DataSettings(path=str(path), val_fraction=0, test_fraction=0)
    one = prepare(settings, llama_tokenizer, cache_dir / "one").examples("train")
    one.ensure_counts(num_proc=1)
    two = prepare(settings, llama_tokenizer, cache_dir / "two").examples("train")
    two.ensure_counts(num_proc=2)  # 9 chunks over 2 forked workers, results in any order
    assert (one.lengths > 0).all() and (one.num_labels > 0).all()
    assert (two.lengths == one.lengths).all() and (two.num_labels == one.num_labels).all()
    assert one.encode([5])[0].input_ids == two.encode([5])[0].input_ids


def test_a_subset_keeps_its_examples_and_known_counts_and_writes_no_counts_file(write_jsonl, llama_tokenizer, cache_dir):
    path = write_jsonl(_records(40))
    examples = prepare(DataSettings(path=str(path), val_fraction=0, test_fraction=0), llama_tokenizer, cache_dir).examples("train")
    examples.encode([3, 9])  # counted; 20 is not yet
    part = examples.subset([3, 9, 20])
    assert len(part) == 3 and part.counts_file is None
    assert list(part.lengths[:2]) == list(examples.lengths[[3, 9]]) and part.lengths[2] == -1
    assert [e.input_ids for e in part.encode([0, 1, 2])] == [e.input_ids for e in examples.encode([3, 9, 20])]
    assert part.lengths[2] == examples.lengths[20] > 0


def test_the_data_and_the_loss_agree_on_the_label_that_is_not_learnt():
    """data/ and model/ are one layer and may not import each other, so each names the masked
    label; they must be the same value, torch's cross_entropy default."""
    import inspect  # noqa: PLC0415

    import torch.nn.functional as F  # noqa: PLC0415

    from amzft.model import loss  # noqa: PLC0415

    assert IGNORE_INDEX == loss.IGNORE_INDEX == inspect.signature(F.cross_entropy).parameters["ignore_index"].default
