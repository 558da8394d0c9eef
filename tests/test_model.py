import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch._dynamo.utils import counters

import amzft.model.module as model_module
from amzft.checkpoints.io import load_checkpoint_file
from amzft.cli.lightning_cli import cli_main
from amzft.data.collate import Collator
from amzft.errors import ConfigError
from amzft.model.generation import GenerationOptions, generate
from amzft.model.loss import head_loss_sum
from amzft.model.module import COMPILE_BREAK_EVEN_STEPS, LoraCausalLM, decide_compile
from amzft.model.settings import ComputeOptions
from amzft.settings import init_kwargs
from amzft.training.callbacks import StopAtStep
from helpers import RecordSteps, fit_args, run_fit, tiny_records


def test_trainable_share_and_lora_targets(tiny_model_dir):
    m = LoraCausalLM(name_or_path=str(tiny_model_dir))
    m.configure_model()
    names = [n for n, p in m.model.named_parameters() if p.requires_grad]
    for target in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]:
        assert any(f".{target}.lora_A." in n for n in names)
    assert all("lora_" in n for n in names)
    assert 0 < m.trainable_share < 0.1


def test_loss_masks_prompt_and_matches_hf_loss(tiny_model_dir, llama_tokenizer):
    """The fast path (lm_head on label positions only) equals HF's own masked mean loss."""
    m = LoraCausalLM(name_or_path=str(tiny_model_dir))
    m.configure_model()
    batch = Collator(llama_tokenizer.pad_token_id)(
        {"input_ids": [[1, 5, 6, 7, 8, 9], [1, 5, 6, 7]], "prompt_len": [3, 2]}
    )
    loss_sum, n = m.token_loss_sum(batch)
    assert n == 3 + 2  # response tokens (EOS included) of both rows; prompt and padding excluded
    hf = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(loss_sum / n, hf, atol=1e-5)
    # By hand: mean CE of logits[t-1] against ids[t] over response positions only.
    logits = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    by_hand = [torch.nn.functional.cross_entropy(logits[r, t - 1], batch["input_ids"][r, t], reduction="sum")
               for r, (p, length) in enumerate(((3, 6), (2, 4))) for t in range(p, length)]
    assert torch.allclose(loss_sum, torch.stack(by_hand).sum(), atol=1e-4)
    m._plain_head = False  # and the generic path agrees with the fast one
    slow_sum, _ = m.token_loss_sum(batch)
    assert torch.allclose(slow_sum, loss_sum, atol=1e-4)


def test_accumulation_2x4_equals_8x1(tiny_model_dir, write_jsonl, tmp_path):
    recs = tiny_records(8)
    for i, r in enumerate(recs):  # very different answer lengths: where naive averaging errs
        r["content"] = " ".join(["word"] * (2 + 12 * (i % 3)))
    data = write_jsonl(recs)
    grads = []
    for batch, accumulate in ((2, 4), (8, 1)):
        rec = RecordSteps()
        run_fit(
            fit_args(tiny_model_dir, data, tmp_path / f"b{batch}", "--trainer.max_steps", "1",
                     "--data.batch_size", str(batch), "--trainer.accumulate_grad_batches", str(accumulate),
                     "--data.batches.shuffle", "false", "--trainer.gradient_clip_val", "null"),
            rec,
        )
        grads.append(rec.grads[0])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    worst = max(float((grads[0][k] - grads[1][k]).abs().max() / (grads[1][k].abs().max() + 1e-12)) for k in grads[0])
    assert worst < 1e-5, worst


# bf16-mixed with cpu.yaml's packed rows and shared preamble: what `precision: auto` trains on a
# CPU where bf16 autocast is the faster (AMX, or AVX512-BF16 when its probe says so).
SHIPPED_BF16 = ("--trainer.precision", "bf16-mixed", "--data.batches.layout", "packed", "--data.batches.share_prefix", "true")


@pytest.mark.parametrize("records, stops, extra", [(10, (2, 3, 4), ()), (30, (3,), SHIPPED_BF16)],
                         ids=["mid-epoch-0+epoch-end+mid-epoch-1", "bf16-packed"])
def test_resume_is_exact_mid_epoch(tiny_model_dir, write_jsonl, tmp_path, records, stops, extra):
    """6 steps straight == the same fit stopped after each of ``stops``, each part resumed from the
    one before with `fit --ckpt_path last`, the last to step 6: same losses, same weights. 10
    records (5 batches of 2 an epoch, windows of 2, 2 and 1: 3 steps an epoch): stopped mid-epoch
    0, exactly at the end of epoch 0 and mid-epoch 1, against one straight run; and 30 records in
    bf16-mixed with packed rows, stopped mid-epoch 0."""
    data = write_jsonl(tiny_records(records))
    # checkpoint.every_n_train_steps stays at 20: last.ckpt at each stop comes from StopAtStep,
    # as in the demo (ModelCheckpoint alone would only write it at step 20).
    common = ("--trainer.max_steps", "6", "--trainer.accumulate_grad_batches", "2", *extra)
    straight = RecordSteps()
    a = run_fit(fit_args(tiny_model_dir, data, tmp_path / "a", *common), straight)
    assert a.trainer.precision == ("bf16-mixed" if extra else "32-true")
    assert len(straight.losses) == 6
    done = 0
    for stop in (*stops, 6):
        part = RecordSteps()
        resume = ("--ckpt_path", "last") if done else ()
        stopper = (StopAtStep(stop),) if stop < 6 else ()
        b = run_fit(fit_args(tiny_model_dir, data, tmp_path / "b", *common, *resume), part, *stopper,
                    resumed_from_last=done > 0)
        assert part.losses == straight.losses[done:stop] and b.trainer.global_step == stop, (done, stop)
        done = stop
    wa = {k: v for k, v in a.model.state_dict().items()}
    wb = {k: v for k, v in b.model.state_dict().items()}
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b.trainer.logger.version == 0  # resumed into the same TensorBoard run
    ckpt_dir = tmp_path / "b" / "logs" / "amzft" / "version_0" / "checkpoints"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not list(ckpt_dir.glob("last-v*.ckpt"))


def test_checkpoint_holds_only_the_adapter(tiny_model_dir, tiny_data, tmp_path):
    cli = run_fit(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "2"))
    ckpt = load_checkpoint_file(cli.trainer.checkpoint_callback.last_model_path)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["name_or_path"] == str(tiny_model_dir)
    events = list((tmp_path / "logs" / "amzft" / "version_0").glob("events.out.tfevents.*"))
    assert events

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/grad_norm", "train/tokens_per_s", "train/label_tokens", "train/peak_memory_mib"):
        assert tag in tags
    assert any(t.startswith("lr-") for t in tags)
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_scheduler_is_linear_warmup_then_decay(tiny_model_dir, tiny_data, tmp_path):
    cli = cli_main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "60"), run=False)
    cli.model.configure_model()
    cli.model.trainer = cli.trainer
    sched = cli.model.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(61):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    peak = cli.model.optim.lr
    assert lrs[0] == 0 and math.isclose(lrs[5], peak) and math.isclose(lrs[1], peak / 5)
    assert math.isclose(lrs[30], peak * 30 / 55) and lrs[60] == 0


@pytest.mark.e2e
def test_sigterm_or_ctrl_c_writes_last_checkpoint_at_a_step_and_says_how_to_resume(tiny_model_dir, tiny_data, tmp_path):
    """SIGTERM (a scheduler's) and SIGINT (Ctrl-C), each sent to its own `python -m amzft fit`
    once step 2's checkpoint is written (the two processes run side by side): each exits 0,
    saying how to resume, with last.ckpt saved at an optimizer step."""
    runs = {}
    try:
        for sig in ("SIGTERM", "SIGINT"):
            # compile off: cpu.yaml's compile auto would compile a 100000-step run before its first step
            args = fit_args(tiny_model_dir, tiny_data, tmp_path / sig, "--trainer.max_steps", "100000",
                            "--model.compute.compile", "false", "--trainer.accumulate_grad_batches", "3",
                            "--checkpoint.every_n_train_steps", "2")
            with (tmp_path / f"{sig}.out").open("w") as out:  # a file: a full pipe would stall the run
                proc = subprocess.Popen([sys.executable, "-m", "amzft", *args], stdout=out, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            runs[sig] = proc, tmp_path / sig / "logs" / "amzft" / "version_0" / "checkpoints"
        waiting, deadline = dict(runs), time.time() + 300
        while waiting:
            for sig, (proc, ckpt_dir) in list(waiting.items()):
                if (ckpt_dir / "step00002.ckpt").exists():
                    proc.send_signal(getattr(signal, sig))
                    del waiting[sig]
                else:
                    assert proc.poll() is None, (tmp_path / f"{sig}.out").read_text()
                    assert time.time() < deadline, f"{sig}: no step 2 checkpoint"
            time.sleep(0.2)
        for sig, (proc, ckpt_dir) in runs.items():
            proc.wait(timeout=120)
            out = (tmp_path / f"{sig}.out").read_text()
            assert proc.returncode == 0, out
            assert f"{sig} received; stopped after optimizer step" in out and "--ckpt_path last" in out
            state = load_checkpoint_file(ckpt_dir / "last.ckpt")
            assert state["global_step"] >= 2
            done = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
            assert done % 3 == 0 or done == 15, sig  # saved at a window boundary (or the epoch's last batch)
    finally:
        for proc, _ in runs.values():
            proc.kill()  # a no-op once it has exited


def test_each_epoch_is_reshuffled_under_the_trainer(tiny_model_dir, write_jsonl, tmp_path):
    """Lightning never calls set_epoch on a batch sampler: the sampler reads the trainer's epoch."""
    seen: dict[int, list] = {}

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(trainer.current_epoch, []).append(tuple(batch["input_ids"][:, :60].flatten().tolist()))

    data = write_jsonl(tiny_records(10))  # 5 batches of 2 per epoch
    run_fit(fit_args(tiny_model_dir, data, tmp_path, "--trainer.max_steps", "10", "--trainer.accumulate_grad_batches", "1"),
            Record())
    assert sorted(seen) == [0, 1] and len(seen[0]) == len(seen[1]) == 5
    assert seen[0] != seen[1]  # another order (and, batches being re-formed, other pairs)


def test_compiled_layers_train_like_eager_and_generate_eagerly(tiny_model_dir, write_jsonl, tmp_path):
    """model.compute.compile: the same losses and adapter as eager (to float tolerance: the fused
    kernels sum in another order), checkpoints with the same keys, and generation still works
    (it runs the layers eagerly, so no recompilation per decoded length)."""
    data = write_jsonl(tiny_records(16))
    runs = {}
    for name in ("eager", "compiled"):
        rec = RecordSteps()
        cli = run_fit(fit_args(tiny_model_dir, data, tmp_path / name, "--trainer.max_steps", "3",
                               "--model.compute.compile", str(name == "compiled").lower()), rec)
        runs[name] = (rec, cli)
    (eager, a), (compiled, b) = runs["eager"], runs["compiled"]
    layer = b.model.model.get_base_model().get_decoder().layers[0]
    assert layer._compiled_call_impl is not None  # really compiled, not silently eager
    assert a.model.model.get_base_model().get_decoder().layers[0]._compiled_call_impl is None
    assert len(compiled.losses) == 3 and compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-5) for k in wa)
    ckpt = load_checkpoint_file(b.trainer.checkpoint_callback.last_model_path)
    assert ckpt["state_dict"].keys() == wa.keys() and ckpt["hyper_parameters"]["compute"]["compile"] is True

    graphs = counters["stats"]["unique_graphs"]
    answers = generate(b.model, ["What is the description of product Tutu?"] * 2, GenerationOptions(max_new_tokens=5))
    assert len(answers) == 2 and counters["stats"]["unique_graphs"] == graphs  # nothing compiled for decoding


def test_compile_is_for_the_hf_backend_only():
    with pytest.raises(ConfigError, match="model.compute.compile works with backend hf only"):
        LoraCausalLM(backend="unsloth", compute=ComputeOptions(compile=True))
    LoraCausalLM(backend="unsloth", compute=ComputeOptions(compile="auto"))  # auto decides "off" for it (below)


def never():
    raise AssertionError("max_steps is set: no estimate")


def test_compile_auto_decision():
    below, above = COMPILE_BREAK_EVEN_STEPS - 1, COMPILE_BREAK_EVEN_STEPS
    assert decide_compile(below, never, "cpu") == (False, f"max_steps {below} < {above}, the steps after which "
                                                          "its one-time compilation pays off")
    chosen, why = decide_compile(above, never, "cpu")
    assert chosen and why.startswith(f"max_steps {above} >= {above}")
    # An epoch-based run (max_steps -1): the steps estimated from max_epochs x batches.
    assert decide_compile(-1, lambda: 40.0, "cpu")[0] is False
    chosen, why = decide_compile(-1, lambda: float(above * 3), "cpu")
    assert chosen and f"~{above * 3} optimizer steps estimated from max_epochs" in why
    assert decide_compile(-1, lambda: math.inf, "cpu")[0] is True  # max_epochs -1: as long as it takes
    assert decide_compile(10_000, never, "cpu", backend="unsloth") == (False, "backend unsloth brings its own kernels")
    assert decide_compile(10_000, never, "mps") == (False, "auto compiles on CPU and CUDA only, not mps")


def test_compile_auto_stays_off_where_torch_compile_cannot_run(monkeypatch):
    def no_compiler():
        raise RuntimeError("no g++")

    monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", no_compiler)
    chosen, why = decide_compile(10_000, never, "cpu")
    assert not chosen and "no C++ compiler" in why
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    assert decide_compile(10_000, never, "cpu")[1] == "torch.compile does not support this Python / platform"


def test_compile_auto_in_a_fit(tiny_model_dir, tiny_data, tmp_path, caplog, monkeypatch):
    """configs/cpu.yaml says compile: auto. A short fit stays eager and says why; past the
    break-even the layers are compiled (the compilation itself is test_compiled_layers_…'s);
    checkpoints of old runs (compile true / false) still build a module."""
    cli = run_fit(fit_args(tiny_model_dir, tiny_data, tmp_path / "short", "--trainer.max_steps", "2"))
    assert cli.model.compute.compile == "auto"
    assert cli.model.model.get_base_model().get_decoder().layers[0]._compiled_call_impl is None
    assert "model.compute.compile auto -> off: max_steps 2 < " in caplog.text
    compiled = []
    monkeypatch.setattr(model_module, "COMPILE_BREAK_EVEN_STEPS", 2)
    monkeypatch.setattr(LoraCausalLM, "_compile_layers", lambda self: compiled.append(self))
    run_fit(fit_args(tiny_model_dir, tiny_data, tmp_path / "long", "--trainer.max_steps", "2"))
    assert len(compiled) == 1 and "model.compute.compile auto -> on: max_steps 2 >= 2" in caplog.text

    saved = load_checkpoint_file(cli.trainer.checkpoint_callback.last_model_path)["hyper_parameters"]
    for old in (True, False):
        module = LoraCausalLM(**{**init_kwargs(LoraCausalLM, saved), "compute": ComputeOptions(compile=old)})
        assert module.compute.compile is old


def test_chunked_head_loss_equals_one_pass(tiny_model_dir, llama_tokenizer):
    """loss_chunk_tokens changes memory, not maths: the same loss and LoRA gradients."""
    ids = [[llama_tokenizer.bos_token_id, *range(1000, 1000 + n)] for n in (40, 27)]
    batch = Collator(llama_tokenizer.pad_token_id)({"input_ids": ids, "prompt_len": [8, 12]})
    results = []
    for chunk in (0, 10):  # 10 does not divide the 49 label tokens: a short last chunk too
        m = LoraCausalLM(name_or_path=str(tiny_model_dir), compute=ComputeOptions(loss_chunk_tokens=chunk))
        m.configure_model()
        with torch.no_grad():  # non-zero LoRA B, so that the gradients reach every adapter
            for n, p in m.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        loss_sum, n = m.token_loss_sum(batch)
        loss_sum.backward()
        results.append((loss_sum.detach(), n, {k: p.grad.clone() for k, p in m.model.named_parameters() if p.grad is not None}))
    (one, n_one, g_one), (chunked, n_chunked, g_chunked) = results
    assert n_one == n_chunked == 49  # (41 - 8) + (28 - 12) response tokens
    torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-5)
    assert g_one.keys() == g_chunked.keys() and g_one
    for k in g_one:
        torch.testing.assert_close(g_chunked[k], g_one[k], rtol=1e-3, atol=1e-5)  # fp32 sums reordered


def test_chunked_head_keeps_one_chunk_of_logits_for_backward():
    """What the head's forward keeps for backward, counted with autograd's saved-tensor hooks:
    the whole micro-batch's fp32 logits in one pass, only the (small) inputs when chunked."""
    head = torch.nn.Linear(16, 5000, bias=False).requires_grad_(False)
    hidden = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 5000, (300,))
    logits_bytes = 300 * 5000 * 4
    kept = {}
    for chunk in (0, 32):
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = head_loss_sum(head, hidden, targets, chunk)
        loss.backward()
        kept[chunk] = sum(saved)
    assert kept[0] >= logits_bytes and kept[32] < logits_bytes / 100, kept
    with pytest.raises(Exception, match="loss_chunk_tokens must be >= 0"):
        LoraCausalLM(compute=ComputeOptions(loss_chunk_tokens=-1))
