"""``python -m amzft describe``: a catalogue of titles answered in input order, streamed,
resumable after a kill, the same on 2 processes as on 1, and never mixing two runs' answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from amzft.catalogue.plan import PlanSettings, plan_batches, shard
from amzft.catalogue.run import PartWriter
from amzft.catalogue.store import OutputStore, row_bytes
from amzft.catalogue.titles import TitleRecord
from amzft.cli.main import main
from amzft.data.stats import PipelineStats
from amzft.inference.load import load_answerer
from amzft.model.generation import generate_answers
from helpers import one_line_error, tiny_records

# ~55-token prompts + 5 new tokens: 4 rows a batch, so 29 titles make 8 batches.
SMALL_BATCHES = ("--max_new_tokens", "5", "--token_budget", "250", "--progress_every", "0")


@pytest.fixture(scope="module")
def trained(trained_run, tmp_path_factory):
    """The session's checkpoint of the tests' shrunk cpu.yaml (2 steps; conftest, read only), and
    a second one with other weights."""
    other = torch.load(trained_run, weights_only=True)
    key = next(k for k in other["state_dict"] if "lora_B" in k)
    other["state_dict"][key] = other["state_dict"][key] + 0.5
    path = tmp_path_factory.mktemp("describe-other") / "other.ckpt"
    torch.save(other, path)
    return trained_run, path


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    """30 titles: some with a uid, some with a description, plus lines a catalogue export has."""
    lines = []
    for i, record in enumerate(tiny_records(30)):
        row = {"title": record["title"]}
        if i % 3 == 0:
            row["uid"] = f"B{i:04d}"
        if i % 2 == 0:
            row["content"] = record["content"]
        lines.append(json.dumps(row))
    lines[5:5] = ["{not json", json.dumps({"uid": "X1"}), json.dumps({"title": "   "}), ""]
    path = tmp_path_factory.mktemp("catalogue") / "titles.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def describe(ckpt, data, out, *extra) -> None:
    main(["describe", "--ckpt_path", str(ckpt), "--data.path", str(data), "--out", str(out), *SMALL_BATCHES, *extra])


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(trained, catalogue, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "descriptions.jsonl"
    describe(trained[0], catalogue, out)
    return out


def test_every_good_line_is_answered_in_input_order_and_bad_lines_are_counted(straight, catalogue):
    rows = rows_of(straight)
    source = catalogue.read_text().splitlines()
    good = [n for n, line in enumerate(source, 1) if line.startswith('{"title": "Item')]
    assert [r["line"] for r in rows] == good and len(rows) == 30
    for row in rows:
        given = json.loads(source[row["line"] - 1])
        assert row["title"] == given["title"]
        assert row.get("uid") == given.get("uid") and ("reference" in row) == ("content" in given)
        assert row["stop"] in ("eos", "length") and 1 <= row["new_tokens"] <= 5 and isinstance(row["description"], str)
    meta = json.loads(Path(str(straight) + ".meta.json").read_text())
    assert meta["written"] == 30 and meta["input_lines"] == 33  # the blank line is no record
    assert meta["skipped"] == {"malformed_json": 1, "missing_field": 1, "empty_title": 1}
    assert meta["skipped_lines"]["malformed_json"] == [6]
    assert meta["identity"]["checkpoint"]["sha256"] and not Path(str(straight) + ".partial").exists()


def test_one_title_at_a_time_gives_the_naive_loops_answers(trained, catalogue, tmp_path):
    """With one title a batch the command answers exactly what ``generate`` gives for the
    training prompt of that title (the prompt, the adapter and the decoding are the right ones)."""
    out, head = tmp_path / "one.jsonl", tmp_path / "head.jsonl"
    head.write_text("".join(catalogue.read_text().splitlines(keepends=True)[:4]))  # the catalogue's first 4 titles
    describe(trained[0], head, out, "--max_batch", "1")
    rows = rows_of(out)
    assert len(rows) == 4
    loaded = load_answerer(trained[0])
    module, fmt = loaded.module, loaded.prompt
    for row in rows:
        [answer] = generate_answers(module, [row["title"]], fmt, max_new_tokens=5, batch_size=1)
        assert row["description"] == answer


class KillMidWrite(Exception):
    pass


def test_a_kill_mid_write_then_resume_equals_a_straight_run(trained, catalogue, straight, tmp_path, monkeypatch, capsys):
    out = tmp_path / "descriptions.jsonl"
    write = PartWriter.on_predict_batch_end

    def dying(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.written >= 8:  # two batches on disk, then half a row of the third: a kill mid-write
            self.handle.write(row_bytes(outputs[0])[:20])
            self.handle.flush()
            raise KillMidWrite
        write(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(PartWriter, "on_predict_batch_end", dying)
    with pytest.raises(SystemExit):
        describe(trained[0], catalogue, out)
    assert not out.exists()
    part = Path(str(out) + ".partial") / "rank0.jsonl"
    assert not part.read_bytes().endswith(b"\n")
    monkeypatch.setattr(PartWriter, "on_predict_batch_end", write)
    capsys.readouterr()
    describe(trained[0], catalogue, out)
    assert "22 on this process this run, 8 from before" in capsys.readouterr().out
    assert out.read_bytes() == straight.read_bytes()


def test_sigterm_stops_after_the_batch_in_flight_and_the_run_resumes(trained, catalogue, straight, tmp_path,
                                                                     monkeypatch, capsys):
    """Lightning's predict loop notes SIGTERM and runs on: describe stops once the batch in
    flight is written, in one line, and the same command finishes the file."""
    out = tmp_path / "descriptions.jsonl"
    write = PartWriter.on_predict_batch_end

    def signalled(self, trainer, *args, **kwargs):
        trainer._signal_connector.received_sigterm = True  # as its SIGTERM handler does
        write(self, trainer, *args, **kwargs)

    monkeypatch.setattr(PartWriter, "on_predict_batch_end", signalled)
    error = one_line_error(capsys, "describe", "--ckpt_path", str(trained[0]), "--data.path", str(catalogue),
                           "--out", str(out), *SMALL_BATCHES)
    assert "stopped by SIGTERM after 4 descriptions" in error and "the same command resumes" in error
    monkeypatch.setattr(PartWriter, "on_predict_batch_end", write)
    describe(trained[0], catalogue, out)
    assert out.read_bytes() == straight.read_bytes()


def test_another_checkpoint_or_decoding_is_refused_and_a_finished_run_is_not_redone(trained, catalogue, straight,
                                                                                    tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    out.write_bytes(straight.read_bytes())
    Path(str(out) + ".meta.json").write_bytes(Path(str(straight) + ".meta.json").read_bytes())
    error = one_line_error(capsys, "describe", "--ckpt_path", str(trained[1]), "--data.path", str(catalogue),
                           "--out", str(out), *SMALL_BATCHES)
    assert "holds answers of another run (checkpoint:" in error
    error = one_line_error(capsys, "describe", "--ckpt_path", str(trained[0]), "--data.path", str(catalogue),
                           "--out", str(out), *SMALL_BATCHES, "--repetition_penalty", "1.3")
    assert "(decoding:" in error
    describe(trained[0], catalogue, out)
    assert "is complete (30 descriptions" in capsys.readouterr().out
    assert out.read_bytes() == straight.read_bytes()
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("mine\n")
    error = one_line_error(capsys, "describe", "--data.path", str(catalogue), "--out", str(foreign))
    assert "was not written by amzft describe" in error and foreign.read_text() == "mine\n"


def test_bad_input_and_options_give_one_line(catalogue, tmp_path, capsys):
    csv = tmp_path / "titles.csv"
    csv.write_text("title,content\nMug,A mug\nLamp,A lamp\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    untitled = tmp_path / "untitled.jsonl"
    untitled.write_text('{"name": "Mug"}\n{"name": "Lamp"}\n')
    cases = {
        (str(csv), "out.jsonl"): "looks like CSV",
        (str(empty), "out.jsonl"): "file is empty",
        (str(untitled), "out.jsonl"): "no title to describe in its 2 lines (missing_field=2 (first lines [1, 2]))",
        (str(tmp_path / "missing.jsonl"), "out.jsonl"): "no such file",
        (str(catalogue), str(catalogue)): "is the input file",
        (str(catalogue), str(tmp_path)): "is a directory",
    }
    for (data, out), expected in cases.items():
        out = out if os.path.isabs(out) else str(tmp_path / out)
        assert expected in one_line_error(capsys, "describe", "--data.path", data, "--out", out)
    error = one_line_error(capsys, "describe", "--data.path", str(catalogue), "--out", str(tmp_path / "o.jsonl"),
                           "--token_budget", "0")
    assert "--token_budget must be >= 1" in error


@pytest.mark.e2e
@pytest.mark.xdist_group("ddp")  # one DDP pair at a time under xdist: they would share the cores and ports
def test_two_processes_write_what_one_writes(trained, catalogue, straight, tmp_path):
    """DDP predict on 2 gloo processes (Lightning's launcher): each its shard and part file,
    merged in order: the same file as one process. Then a file of one title: a rank with no
    batch at all still finishes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    one = tmp_path / "one.jsonl"
    one.write_text(catalogue.read_text().splitlines()[0] + "\n")
    for data, name in ((catalogue, "ddp.jsonl"), (one, "ddp-one.jsonl")):
        args = ["describe", "--ckpt_path", str(trained[0]), "--data.path", str(data), "--out", str(tmp_path / name),
                *SMALL_BATCHES, *ddp]
        run = subprocess.run([sys.executable, "-m", "amzft", *args], capture_output=True, text=True, env=env,
                             timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert (tmp_path / "ddp.jsonl").read_bytes() == straight.read_bytes()
    assert (tmp_path / "ddp-one.jsonl").read_bytes() == straight.read_bytes().splitlines(keepends=True)[0]


# ----------------------------------------------------------------------------- the plan and the store
def _records(n: int) -> list[TitleRecord]:
    return [TitleRecord(line=i + 1, title="t" * (1 + (i * 7) % 13), uid=None, reference=None) for i in range(n)]


def _encode(titles):
    return [[0] * len(t) for t in titles]


def test_the_plan_is_the_same_for_any_number_of_processes_and_what_is_done():
    settings = PlanSettings(token_budget=60, max_batch=5, chunk=16, max_new_tokens=4, max_prompt_tokens=12)
    stats = PipelineStats()
    batches = list(plan_batches(_records(50), _encode, settings, stats))
    assert stats.skipped["prompt_too_long"] == len([r for r in _records(50) if len(r.title) > 12])
    for b in batches:
        longest = max(len(ids) for ids in b.prompt_ids)
        assert len(b.records) <= 5 and (len(b.records) == 1 or len(b.records) * (longest + 4) <= 60)
        assert b.prompt_ids == _encode([r.title for r in b.records])
    lines = sorted(r.line for b in batches for r in b.records)
    assert len(lines) == len(set(lines)) == 50 - stats.skipped["prompt_too_long"]
    for world in (1, 2, 3):
        shards = [list(shard(iter(batches), rank, world)) for rank in range(world)]
        assert sorted(b.index for s in shards for b in s) == [b.index for b in batches]
    # Done: a batch whose lines are all written is skipped; one written in part is done again whole.
    done = np.array(sorted([r.line for r in batches[0].records] + [batches[1].records[0].line]))
    left = [b.index for b in shard(iter(batches), 0, 1, done)]
    assert left == [b.index for b in batches[1:]]


def test_the_store_ignores_a_cut_row_repairs_its_own_part_and_merges_in_order(tmp_path):
    store = OutputStore(tmp_path / "out.jsonl")
    assert store.start({"k": 1}) == "fresh"
    with store.open_part(0) as f:
        f.write(row_bytes({"line": 5, "title": "b"}) + row_bytes({"line": 2, "title": "a"}) + b'{"line": 9, "ti')
    (store.partial / "rank1.jsonl").write_bytes(row_bytes({"line": 3, "title": "c"}) + row_bytes({"line": 2, "title": "a"}))
    assert store.done_lines().tolist() == [2, 3, 5]
    with store.open_part(0) as f:
        f.write(row_bytes({"line": 9, "title": "d"}))
    assert store.start({"k": 1}) == "resume"
    with pytest.raises(Exception, match=r"another run \(k: 1 there, 2 now\)"):
        store.start({"k": 2})
    assert store.merge({"note": "x"}) == 4
    assert [r["line"] for r in rows_of(store.out)] == [2, 3, 5, 9]
    assert json.loads(store.meta.read_text())["identity"] == {"k": 1} and not store.partial.exists()
    assert store.start({"k": 1}) == "complete"
