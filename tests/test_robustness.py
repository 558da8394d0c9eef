"""Robustness: bad input gives one line, kills lose nothing, NaN stops or skips cleanly,
an unwritable or full disk is caught before training, and nothing reaches the network."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from transformers import GPT2Config, GPT2LMHeadModel

from amzft.checkpoints.io import atomic_torch_save, load_checkpoint_file
from amzft.cli.lightning_cli import cli_main
from amzft.cli.main import main
from amzft.data import build
from amzft.data.build import DataSettings, prepare
from amzft.errors import ConfigError, ModelError
from amzft.training.nonfinite import MAX_CONSECUTIVE_SKIPS
from fault_helpers import ATTEMPTS, NetworkAccess
from helpers import copy_run, fit_args, one_line_error, tiny_records

TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------ bad configs and paths
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.nope", "3"], "unrecognized arguments: --model.nope 3 (see: python -m amzft fit --help)"),
        (["--model.optim.lr", "abc"], 'Parser key "model.optim.lr": Expected a <class \'float\'>. Got value: abc'),
        (["--data.batch_size", "-2"], "data.batch_size and eval_batch_size must be >= 1, found -2"),
        (["--trainer.max_steps", "-5"], "`max_steps` must be a non-negative integer or -1"),
        (["--model.on_nonfinite", "ignore"], "model.on_nonfinite"),
    ],
)
def test_unknown_keys_and_wrong_types_are_one_line(extra, message, tiny_model_dir, tiny_data, tmp_path, capsys):
    line = one_line_error(capsys, *fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "1", *extra))
    assert message in line


def test_bad_yaml_files_are_one_line_naming_the_file(tiny_model_dir, tiny_data, tmp_path, capsys):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  bogus: 1\n")
    line = one_line_error(capsys, *fit_args(tiny_model_dir, tiny_data, tmp_path, "--config", str(unknown)))
    assert "does not accept option 'model.bogus'" in line
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [1,\n")
    line = one_line_error(capsys, *fit_args(tiny_model_dir, tiny_data, tmp_path, "--config", str(broken)))
    assert str(broken) in line and "line 2" in line
    line = one_line_error(capsys, "fit", "--config", str(tmp_path / "missing.yaml"))
    assert "File does not exist" in line and "missing.yaml" in line


def test_other_commands_reject_unknown_options_in_one_line(capsys):
    assert "unrecognized arguments: --bogus" in one_line_error(capsys, "ask", "--bogus", "1")


def test_debug_shows_the_traceback_instead(tiny_model_dir, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="model.optim.lr must be a positive number"):
        main([*fit_args(tiny_model_dir, tiny_data, tmp_path, "--model.optim.lr", "-1"), "--debug"])
    with pytest.raises(Exception, match="max_steps"):
        main([*fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "-5"), "--debug"])


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model_dir):
    """An empty folder, a tokenizer without a model, a BERT config, and a GPT-2 (no q/k/v_proj):
    made once, read only."""
    made, tmp_path = {}, tmp_path_factory.mktemp("model-dirs")
    for name in ("empty", "tokenizer_only", "bert", "gpt2"):
        made[name] = tmp_path / name
        made[name].mkdir()
        if name != "empty":
            for f in tiny_model_dir.glob("tokenizer*"):
                shutil.copy(f, made[name])
    (made["bert"] / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128256)).save_pretrained(made["gpt2"])
    return made


@pytest.mark.parametrize(
    "which, message",
    [
        ("empty", "holds no tokenizer files"),
        ("tokenizer_only", "is not a model directory (no config.json in it)"),
        ("bert", "cannot load a causal LM (bert)"),
        ("gpt2", "are not modules of the gpt2 model in"),
    ],
)
def test_model_dir_empty_or_another_architecture(which, message, model_dirs, tiny_data, tmp_path, capsys):
    line = one_line_error(capsys, *fit_args(model_dirs[which], tiny_data, tmp_path, "--trainer.max_steps", "1"))
    assert message in line and str(model_dirs[which]) in line


def test_max_length_shorter_than_every_prompt_is_clear(tiny_model_dir, tiny_data, tmp_path, capsys):
    line = one_line_error(capsys, *fit_args(tiny_model_dir, tiny_data, tmp_path, "--data.max_length", "16"))
    assert "prompt_too_long" in line or "max_length" in line


def test_a_huge_record_is_truncated_not_fatal(write_jsonl, llama_tokenizer, tmp_path):
    huge = {"title": "Huge manual", "content": "word " * 600_000}  # 3 MB on one line
    path = write_jsonl([*tiny_records(10), huge])
    assert path.stat().st_size > 3_000_000
    built = prepare(DataSettings(path=str(path), max_length=64, val_fraction=0, test_fraction=0),
                    llama_tokenizer, cache_dir=tmp_path / "cache")
    train = built.splits["train"]
    lengths = [len(row["input_ids"]) for row in train]
    assert len(train) == 11 and max(lengths) == 64


def _rows(prepared):
    return {name: [(r["line"], r["input_ids"], r["title"], r["content"]) for r in data] for name, data in prepared.splits.items()}


def test_bom_and_json_array_files_build_the_same_examples(write_jsonl, llama_tokenizer, tmp_path):
    """Files a user may have: the JSON Lines file with a byte-order mark, and the same records
    as one pretty-printed JSON array (element n numbered n, so the rows match line for line),
    through the serial and the parallel build; markup-only descriptions and control characters
    are cleaned the same way in each."""
    records = [*tiny_records(20), {"title": "Mug\x00Blue", "content": "A\x07 mug."}, {"title": "T", "content": "<p>&nbsp;</p>"},
               {"title": "\x01\x02", "content": "Untitled."}, {"title": "Mug\x00Blue", "content": "A mug."}, {"title": "Half"}]
    jsonl = write_jsonl(records)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + jsonl.read_bytes())
    array = tmp_path / "array.json"
    array.write_text(json.dumps(records, indent=2))
    settings = DataSettings(path=str(jsonl), val_fraction=0.2, test_fraction=0.2)
    want = prepare(settings, llama_tokenizer, tmp_path / "want", num_proc=1)
    assert want.stats.skipped == {"empty_content": 1, "empty_title": 1, "duplicate": 1, "missing_field": 1}
    assert ("Mug Blue", "A mug.") in [(r["title"], r["content"]) for split in want.splits.values() for r in split]
    for path in (bom, array):
        for num_proc in (1, 2):
            got = prepare(DataSettings(path=str(path), val_fraction=0.2, test_fraction=0.2), llama_tokenizer,
                          tmp_path / f"{path.stem}{num_proc}", num_proc=num_proc)
            assert _rows(got) == _rows(want) and got.stats.to_dict() == want.stats.to_dict(), (path, num_proc)


def test_data_command_reads_an_array_and_says_how_to_convert_a_large_one(tmp_path, capsys, monkeypatch):
    from amzft.data import reader  # noqa: PLC0415 - only this test changes its limit

    array = tmp_path / "records.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(tiny_records(30), indent=2).encode())
    args = ["data", "--data.tokenizer", "llama3.2", "--data.path", str(array), "--data.cache_dir", str(tmp_path / "c")]
    main([*args, "--examples", "1"])
    out = capsys.readouterr().out
    assert "records read: 30" in out and "kept:         30" in out and "skipped: 0" in out
    monkeypatch.setattr(reader, "ARRAY_LIMIT", 1000)
    line = one_line_error(capsys, *args, "--data.cache_dir", str(tmp_path / "c2"))
    assert "amzft reads JSON Lines (one object per line)" in line and f"jq -c '.[]' {array} > {tmp_path / 'records.jsonl'}" in line


# --------------------------------------------------------------------------- disk
def test_unwritable_log_dir_fails_before_training(tiny_model_dir, tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.default_root_dir", str(blocker / "logs"))
    line = one_line_error(capsys, *args)
    assert f"the log folder {blocker / 'logs'} is not writable" in line


def test_full_disk_is_caught_before_training(tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 10 << 20, 4096))
    line = one_line_error(capsys, *fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "1"))
    assert "has 0 MiB free; checkpoints need about" in line
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": {}, "hyper_parameters": {}, "step": 1}, target)

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ModelError, match=r"last.ckpt \(disk full\): No space left on device; the previous last.ckpt is intact"):
        atomic_torch_save({"step": 2}, target)
    monkeypatch.undo()
    assert load_checkpoint_file(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


# ---------------------------------------------------------------------------- NaN
class _PoisonAt:
    """Make the loss of every batch of optimizer step ``step`` (1-based) NaN."""

    def __init__(self, module, step):
        self.real, self.module, self.step = module.token_loss_sum, module, step

    def __call__(self, batch):
        loss, n = self.real(batch)
        if self.module.trainer.global_step + 1 == self.step:
            loss = loss * float("nan")
        return loss, n


def _lora_state(module):
    return {k: v.detach().clone() for k, v in module.model.named_parameters() if v.requires_grad}


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny_model_dir, tiny_data, tmp_path):
    cli = cli_main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "6",
                            "--checkpoint.every_n_train_steps", "2"), run=False)
    cli.model.configure_model()
    cli.model.token_loss_sum = _PoisonAt(cli.model, 4)
    with pytest.raises(ModelError) as error:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    message = str(error.value)
    # 15 batches an epoch: a short last window
    assert "the training loss is nan at step 4 (epoch 0, batches 12-14)" in message and "is intact" in message
    last = load_checkpoint_file(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_nan_loss_with_skip_leaves_the_weights_untouched_and_goes_on(tiny_model_dir, tiny_data, tmp_path):
    snapshots = {}

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots[trainer.global_step] = _lora_state(pl_module)

    cli = cli_main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "6",
                            "--model.on_nonfinite", "skip", "--model.optim.optimizer", "adamw"), run=False)
    cli.trainer.callbacks.append(Snapshot())
    cli.model.configure_model()
    cli.model.token_loss_sum = _PoisonAt(cli.model, 4)
    with pytest.warns(UserWarning, match="the training loss is nan at step 4 .* step skipped"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 6 and cli.model.skipped_steps == 1
    assert all(torch.equal(snapshots[3][k], snapshots[4][k]) for k in snapshots[3])  # step 4: no update
    assert not all(torch.equal(snapshots[4][k], snapshots[5][k]) for k in snapshots[4])  # step 5: trains again
    assert all(torch.isfinite(v).all() for v in snapshots[6].values())
    assert cli.trainer.callback_metrics["train/skipped_steps"] == 1


def test_skip_gives_up_when_every_step_is_nan(tiny_model_dir, tiny_data, tmp_path):
    cli = cli_main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "50",
                            "--model.on_nonfinite", "skip", "--trainer.accumulate_grad_batches", "1"), run=False)
    cli.model.configure_model()
    real = cli.model.token_loss_sum
    cli.model.token_loss_sum = lambda batch: (real(batch)[0] * float("nan"), real(batch)[1])
    with pytest.warns(UserWarning), pytest.raises(ModelError, match=f"{MAX_CONSECUTIVE_SKIPS} steps in a row were skipped"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == MAX_CONSECUTIVE_SKIPS


# ----------------------------------------------------------------------- SIGKILL
def _fit_process(tiny_model_dir, data, tmp_path, logs, *callbacks, extra=()):
    args = fit_args(tiny_model_dir, data, tmp_path, "--trainer.max_steps", "8", "--checkpoint.every_n_train_steps", "2",
                    "--trainer.default_root_dir", str(logs), *extra)
    for class_path, init_args in callbacks:
        args += ["--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "amzft", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def _wait_for(path: Path, proc, seconds=240):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "timeout"
        time.sleep(0.1)


def _finish(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def _losses(path: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # after a resume, a re-run step overwrites


def _adapter(logs: Path) -> dict:
    return load_checkpoint_file(next(logs.rglob("last.ckpt")))["state_dict"]


@pytest.mark.e2e
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tiny_data, tmp_path):
    # The uninterrupted run (its own data cache) and the one to be killed go side by side.
    straight = tmp_path / "straight.jsonl"
    uninterrupted = _fit_process(tiny_model_dir, tiny_data, tmp_path / "a", tmp_path / "a",
                                 ("fault_helpers.RecordLosses", {"path": str(straight)}))
    killed, marker = tmp_path / "killed.jsonl", tmp_path / "hanging"
    proc = _fit_process(tiny_model_dir, tiny_data, tmp_path, tmp_path / "b",
                        ("fault_helpers.RecordLosses", {"path": str(killed)}),
                        ("fault_helpers.HangAtStep", {"step": 5, "marker": str(marker)}))
    try:
        _wait_for(marker, proc)
    finally:
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
    _finish(uninterrupted)
    assert sorted(_losses(killed)) == [1, 2, 3, 4, 5]  # step 5 trained, its checkpoint (step 6) never came
    assert load_checkpoint_file(tmp_path / "b" / "amzft" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 4

    out = _finish(_fit_process(tiny_model_dir, tiny_data, tmp_path, tmp_path / "b",
                               ("fault_helpers.RecordLosses", {"path": str(killed)}), extra=("--ckpt_path", "last")))
    assert "Restored all states from the checkpoint" in out
    expected, resumed = _losses(straight), _losses(killed)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):  # steps 5-8 re-run after the kill: the same losses, bit for bit
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "b").rglob("version_1"))  # the resumed run logged into the same run


@pytest.mark.e2e
def test_sigkill_during_a_checkpoint_write_never_corrupts_last(tiny_model_dir, tiny_data, tmp_path):
    marker = tmp_path / "writing"
    logs = tmp_path / "logs"
    proc = _fit_process(tiny_model_dir, tiny_data, tmp_path, logs,
                        ("fault_helpers.HangWhileWriting", {"step": 4, "marker": str(marker)}))
    _wait_for(marker, proc)
    proc.kill()
    proc.wait()
    folder = logs / "amzft" / "version_0" / "checkpoints"
    partial = list(folder.glob(".last.ckpt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # killed mid-write, for real
    assert load_checkpoint_file(folder / "last.ckpt")["global_step"] == 2  # the previous one, whole
    with pytest.raises(ModelError, match="corrupt"):
        load_checkpoint_file(partial[0])

    _finish(_fit_process(tiny_model_dir, tiny_data, tmp_path, logs, extra=("--ckpt_path", "last")))
    assert load_checkpoint_file(folder / "last.ckpt")["global_step"] == 8
    assert not list(folder.glob(".last.ckpt.*.tmp"))  # the stale temporary was cleaned up


# ------------------------------------------------------------------------ network
def test_the_network_guard_really_blocks():
    with pytest.raises(NetworkAccess):
        urllib.request.urlopen("http://example.com", timeout=2)
    assert ATTEMPTS.pop() == "getaddrinfo example.com"  # recorded (and forgiven: this one was ours)


@pytest.mark.e2e
def test_fit_ask_export_without_network_in_a_fresh_process(tiny_model_dir, tiny_data, tmp_path):
    """HF offline variables unset: amzft must set them itself and never try the network."""
    script = (
        "import sys; sys.path.insert(0, %r); from fault_helpers import block_network; attempts = block_network();"
        "from amzft.cli.main import main; argv = %r;"
        "main(argv); main(['ask', 'Item 3 book', '--ckpt_path', %r, '--max_new_tokens', '3', '--compare', 'true']);"
        "main(['export', '--ckpt_path', %r, '--out', %r]);"
        "assert not attempts, attempts; print('OK no network')"
    )
    logs = tmp_path / "logs"
    argv = fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "1")
    ckpt = str(logs / "amzft" / "version_0" / "checkpoints" / "last.ckpt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    out = subprocess.run([sys.executable, "-c", script % (str(TESTS), argv, ckpt, ckpt, str(tmp_path / "export"))],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "OK no network" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("block", [48, 1 << 21])
def test_the_parallel_build_reading_blocks_of_lines_equals_the_serial_build(block, write_jsonl, llama_tokenizer,
                                                                            tmp_path, monkeypatch):
    """A plain JSON Lines file is handed to the workers in blocks of whole lines (the parent
    only reads bytes and counts newlines): line numbers, blank lines, a BOM, a last line without
    a newline, bad lines, duplicates and the skip report come out as the serial build reads them,
    with blocks smaller than a line or holding the whole file."""
    monkeypatch.setattr(build, "BLOCK", block)
    lines = [json.dumps(r) for r in tiny_records(30)]
    lines[3:3] = ["", "   ", '{"title": "broken"', json.dumps({"title": "Dup", "content": "Same."})]
    lines += [b"\xff\xfe".decode("latin-1"), json.dumps({"title": "Dup", "content": "Same."}), ""]
    path = tmp_path / "blocks.json"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("latin-1") + json.dumps(tiny_records(1)[0]).encode())
    settings = DataSettings(path=str(path), val_fraction=0.2, test_fraction=0.2)
    serial = prepare(settings, llama_tokenizer, tmp_path / "serial", num_proc=1)
    parallel = prepare(settings, llama_tokenizer, tmp_path / f"parallel{block}", num_proc=2)
    assert serial.stats.skipped["duplicate"] == 2 and serial.stats.skipped["malformed_json"] == 1  # "Dup", and record 0 again
    assert _rows(parallel) == _rows(serial) and parallel.stats.to_dict() == serial.stats.to_dict()


@pytest.mark.parametrize("block", [300, 1 << 21])
def test_the_parallel_build_lists_the_files_first_skipped_lines(block, write_jsonl, llama_tokenizer, tmp_path,
                                                                  monkeypatch):
    """Workers count their own chunk's skips and the parent dedupes each split's records: with
    more skips of a reason than the report keeps lines of, and duplicates in every split, in one
    chunk or in many, the report lists the file's first lines, as the serial build does."""
    monkeypatch.setattr(build, "BLOCK", block)
    records = tiny_records(12)
    lines = []
    for i, record in enumerate(records):  # a kept record, an empty one, the first again
        lines += [json.dumps(record), json.dumps({"title": f"Empty {i}", "content": ""}), json.dumps(record)]
    lines += [json.dumps(record) for record in reversed(records)]  # and again, later
    path = tmp_path / "skips.json"
    path.write_text("\n".join(lines) + "\n")
    settings = DataSettings(path=str(path), val_fraction=0.3, test_fraction=0.3)
    serial = prepare(settings, llama_tokenizer, tmp_path / "serial", num_proc=1)
    parallel = prepare(settings, llama_tokenizer, tmp_path / f"parallel{block}", num_proc=2)
    assert serial.stats.skipped == {"duplicate": 24, "empty_content": 12}
    assert serial.stats.skipped_lines["duplicate"] == [3, 6, 9, 12, 15]
    assert sum(size > 0 for size in serial.stats.split_sizes.values()) >= 2  # duplicates in several splits
    assert _rows(parallel) == _rows(serial) and parallel.stats.to_dict() == serial.stats.to_dict()


def test_a_broken_checkpoint_is_one_message_wherever_it_is_read(trained_run, tiny_model_dir, tiny_data, tmp_path, capsys):
    """A truncated last.ckpt (a copy cut short) given to fit, ask, evaluate, export and describe:
    the same one line from each, naming the file, what is wrong with it and the newest good
    checkpoint beside it; a file that is no checkpoint at all, and an empty one, say so."""
    ckpt = copy_run(trained_run, tmp_path)
    good = ckpt.with_name("step00002.ckpt")
    shutil.copy(ckpt, good)
    os.utime(good, (1, 1))  # older than last.ckpt, newer than nothing
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    catalogue = tmp_path / "titles.jsonl"
    catalogue.write_text('{"title": "Mug"}\n')
    commands = {
        "fit": [*fit_args(tiny_model_dir, tiny_data, tmp_path), "--ckpt_path", str(ckpt)],
        "ask": ["ask", "Mug", "--ckpt_path", str(ckpt)],
        "evaluate": ["evaluate", "--ckpt_path", str(ckpt), "--samples", "2"],
        "export": ["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")],
        "describe": ["describe", "--ckpt_path", str(ckpt), "--data.path", str(catalogue), "--out", str(tmp_path / "d.jsonl")],
    }
    errors = {name: one_line_error(capsys, *args) for name, args in commands.items()}
    want = (f"amzft: error: checkpoint {ckpt} is corrupt or not a checkpoint: the file is truncated or is not a torch "
            f"checkpoint (an interrupted copy or write?); the newest good checkpoint beside it is {good}")
    assert errors == dict.fromkeys(commands, want)
    ckpt.write_bytes(b"not a checkpoint at all")
    for other in ckpt.parent.glob("*.ckpt"):
        if other != ckpt:
            other.unlink()
    assert one_line_error(capsys, "ask", "Mug", "--ckpt_path", str(ckpt)).endswith(
        f"the file is not a torch checkpoint; no other readable checkpoint in {ckpt.parent}")
    ckpt.write_bytes(b"")
    assert "the file is empty (an interrupted copy or write?)" in one_line_error(capsys, *commands["fit"])


def test_out_of_memory_in_a_step_is_one_line_and_the_checkpoint_before_it_resumes(tiny_model_dir, tiny_data, tmp_path,
                                                                                    capsys):
    """An out-of-memory error in step 3's backward (injected: no GPU here) ends the fit with one line
    naming the step, the micro-batch's size in tokens and the options that shrink it; last.ckpt
    from step 2 is intact and the same command plus --ckpt_path last continues from it."""
    args = fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2",
                    "--model.compute.compile", "false")
    oom = "--trainer.callbacks+=" + json.dumps({"class_path": "fault_helpers.OutOfMemoryAt", "init_args": {"step": 3}})
    error = one_line_error(capsys, *args, oom)
    last = tmp_path / "logs" / "amzft" / "version_0" / "checkpoints" / "last.ckpt"
    assert error.startswith("amzft: error: out of GPU memory at optimizer step 3 on a micro-batch of 2 x ")
    assert "lower data.batch_size (and raise trainer.accumulate_grad_batches), data.max_length" in error
    assert error.endswith(f"{last} is intact: resume with --ckpt_path last")
    assert load_checkpoint_file(last)["global_step"] == 2
    main([*args, "--ckpt_path", "last"])
    assert load_checkpoint_file(last)["global_step"] == 4


@pytest.mark.e2e
def test_preemption_a_second_sigterm_or_a_sigkill_during_the_checkpoint_write_leaves_a_whole_last_ckpt(
        tiny_model_dir, tiny_data, tmp_path):
    """SLURM's preemption: SIGTERM, then (a second SIGTERM, or SIGKILL once the grace period is
    over) while the run writes its last.ckpt. A second SIGTERM changes nothing: the window's
    checkpoint is written whole and the run exits 0 well inside SLURM's default 30 s grace period.
    A SIGKILL mid-write leaves the last.ckpt before it, whole. Both resume."""
    runs = {}
    for name in ("sigterm", "sigkill"):
        logs, marker = tmp_path / name / "logs", tmp_path / f"{name}.writing"
        proc = _fit_process(tiny_model_dir, tiny_data, tmp_path / name, logs,
                            ("fault_helpers.SlowLastWrite", {"step": 3, "marker": str(marker), "seconds": 3}),
                            extra=("--trainer.max_steps", "100000", "--model.compute.compile", "false"))
        runs[name] = proc, logs / "amzft" / "version_0" / "checkpoints", marker
    for name, (proc, folder, _) in runs.items():
        _wait_for(folder / "step00002.ckpt", proc)
        proc.send_signal(signal.SIGTERM)
        runs[name] += (time.time(),)
    for name, (proc, _, marker, _) in runs.items():
        _wait_for(marker, proc)
        proc.send_signal(signal.SIGTERM if name == "sigterm" else signal.SIGKILL)
    proc, folder, _, sent = runs["sigterm"]
    out = _finish(proc)
    assert time.time() - sent < 30 and "SIGTERM received; stopped after optimizer step" in out
    step = load_checkpoint_file(folder / "last.ckpt")["global_step"]
    assert step >= 3 and f"stopped after optimizer step {step}," in out
    proc, folder, _, _ = runs["sigkill"]
    proc.wait(timeout=60)
    assert load_checkpoint_file(folder / "last.ckpt")["global_step"] == 2  # the one before the write, whole
    for name in runs:
        logs = tmp_path / name / "logs"
        _finish(_fit_process(tiny_model_dir, tiny_data, tmp_path / name, logs,
                             extra=("--trainer.max_steps", "6", "--ckpt_path", "last")))
        assert load_checkpoint_file(logs / "amzft" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 6
