"""Training throughput: amzft (each batch layout) vs HF ``Trainer`` + PEFT, in one process.

    python benchmarks/train_throughput.py                       # bundled sample, 8 steps each
    python benchmarks/train_throughput.py --data ../shared/data/amazontitles_trn_first400.jsonl

Same model (embedded SmolLM2-135M-Instruct unless --model), same tokenised train split, batch
2 x accumulate 4, fp32 on CPU, LoRA r16/alpha16 on q,k,v,o,gate,up,down, 8-bit AdamW, lr 2e-4
with 5 warm-up steps. HF Trainer gets what a user would write: the same examples with labels
masked to the response, ``DataCollatorForSeq2Seq`` padding, ``optim="adamw_8bit"``.

Prints, per run, real tokens per second over the steps after the first (warm-up): the tokens
of the examples trained, counted alike for every run (with ``+share`` amzft processes the
shared preamble once per row but trains each example on all of its tokens); padding
efficiency (non-pad positions processed / positions processed); and each amzft run / HF Trainer.
amzft's numbers are the CLI's own ThroughputMeter (amzft.training.throughput), the one ``fit`` logs.

Then, per run, the utilisation: a step's FLOPs counted from the model's shapes at the real
lengths of the rows it computed (amzft.training.flops: padding is not credited; a packed row's
shared preamble counts once; amzft's LM head runs on label tokens, HF's on every position), the
achieved GFLOP/s over the timed steps, and that rate as a share of the machine's own
matrix-multiply rate (torch.mm at an MLP projection's shape, a micro-batch's mean positions
deep), in fp32 and, on a CPU with AVX512-BF16 or AMX, in bf16; then each run's FLOPs by part.

torch, transformers, peft and Lightning are imported inside the functions, after
``force_offline()`` in main(): the Hugging Face libraries read the offline switches when first
imported.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from machine import cpu_flags, cpu_name, gemm_rate, has_bf16_matmul

from amzft.cli.quiet import quiet_libraries
from amzft.sources import force_offline, resolve_model_dir

HF_LORA = {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def run_amzft(args, variant: str, root: str) -> dict:
    """``variant`` is a data.batches.layout, optionally with ``+share`` (data.batches.share_prefix, packed only),
    ``+compile`` (model.compute.compile) and / or ``+bf16`` (trainer.precision bf16-mixed); or
    ``cpu.yaml`` (``+bf16`` allowed): the shipped config's own layout, shared preamble, row
    length, precision and compile choices (``auto`` resolved for this machine), only the batch
    (2 x 4) and lr set to the HF run's."""
    from amzft.cli.lightning_cli import cli_main  # noqa: PLC0415 - after force_offline (module doc)
    from amzft.model.loss import PLAIN_HEAD_MODELS  # noqa: PLC0415
    from amzft.training.flops import ModelShape, StepTokens  # noqa: PLC0415
    from amzft.training.throughput import ThroughputMeter  # noqa: PLC0415

    layout, *flags = variant.split("+")
    unknown = set(flags) - {"share", "compile", "bf16"}
    if unknown:
        raise SystemExit(f"--layouts: unknown option(s) {sorted(unknown)} in {variant!r} (use +share, +compile, +bf16)")
    shipped = layout == "cpu.yaml"
    argv = [
        "--config", "configs/cpu.yaml",
        "--model.name_or_path", args.model,
        "--trainer.max_steps", str(args.steps),
        "--trainer.default_root_dir", root,
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.check_val_every_n_epoch", "1000",
        "--data.holdout.val_fraction", "0.05", "--data.holdout.test_fraction", "0.05",
        "--data.max_length", str(args.max_length),
        # the HF run's batch and lr (cpu.yaml's own do not change the speed, only the fairness)
        "--data.batch_size", "2", "--trainer.accumulate_grad_batches", "4", "--model.optim.lr", "2e-4",
        "--model.optim.warmup_steps", "5",
        "--sample_answers.rouge_products", "0",
    ]
    if not shipped:
        argv += ["--data.batches.layout", layout, "--data.batches.pack_length", "null", "--trainer.precision", "32-true",
                 "--model.compute.compile", str("compile" in flags).lower(), "--data.batches.share_prefix", str("share" in flags).lower()]
    if "bf16" in flags:  # whatever the layout or trainer.precision auto would choose
        argv += ["--trainer.precision", "bf16-mixed"]
    if args.data:
        argv += ["--data.path", args.data]
    cli = cli_main(argv, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # The CLI's own meter: the tokens/s a user's fit logs, timed from the end of step 1.
    meter = next(c for c in cli.trainer.callbacks if isinstance(c, ThroughputMeter))
    s = meter.summary()
    module, micro_batches = cli.model, s["steps_timed"] * cli.trainer.accumulate_grad_batches
    config = module.model.get_base_model().config
    # amzft's label-only head (amzft.model.loss) where the architecture allows, else every position
    head = s["label_tokens"] if config.model_type in PLAIN_HEAD_MODELS else s["processed_tokens"]
    return {"tokens_per_s": s["tokens_per_s"], "padding_efficiency": s["padding_efficiency"],
            "seconds": s["seconds"], "steps": s["steps_timed"], "first_step": s["first_step_s"],
            "work": StepTokens(s["processed_tokens"], s["row_length_squares"], head), "shape": ModelShape.of(config),
            "lora": {"r": module.lora.r, "target_modules": list(module.lora.target_modules)},
            "precision": str(cli.trainer.precision), "micro_positions": s["padded_tokens"] / max(micro_batches, 1)}


def run_hf_trainer(args, root: str, bf16: bool = False) -> dict:
    """HF Trainer + PEFT as a user writes it. ``bf16``: the seed notebook's own ``bf16=True``,
    stopped after ``--seed-bf16-seconds`` (bf16 autocast was 13-30x slower than fp32 on an
    AVX2-only CPU) and timed per micro-batch, so a slow CPU still gives a figure."""
    import torch  # noqa: PLC0415 - after force_offline (module doc), as the four below
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import (  # noqa: PLC0415
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from amzft.data.module import AmazonTitlesDataModule  # noqa: PLC0415
    from amzft.data.settings import HoldoutOptions  # noqa: PLC0415
    from amzft.training.flops import ModelShape, StepTokens  # noqa: PLC0415

    data = AmazonTitlesDataModule(path=args.data, tokenizer=args.model, max_length=args.max_length,
                                  holdout=HoldoutOptions(val_fraction=0.05, test_fraction=0.05))
    train = data.split("train")

    def with_labels(row):
        p = row["prompt_len"]
        return {"input_ids": row["input_ids"], "labels": [-100] * p + row["input_ids"][p:]}

    dataset = train.map(with_labels, remove_columns=train.column_names)
    directory = resolve_model_dir(args.model)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **HF_LORA))
    counts = {"real": 0, "padded": 0, "start": None, "steps": 0, "fit_start": None, "batches": 0, "work": StepTokens(0, 0, 0)}
    micro_tokens: list[int] = []  # real tokens of each micro-batch, in training order
    micro_work: list[tuple[StepTokens, int]] = []  # what each micro-batch computes (amzft.training.flops), its padded positions
    micro_ends: list[float] = []  # when each micro-batch's forward + backward (+ step) ended
    collator = DataCollatorForSeq2Seq(data.tokenizer, padding=True, label_pad_token_id=-100)

    def counting_collator(features):
        batch = collator(features)
        lengths = batch["attention_mask"].sum(1).tolist()
        micro_tokens.append(sum(lengths))
        micro_work.append((StepTokens.of_rows(lengths, sum(lengths)), batch["input_ids"].numel()))  # HF's head: every position
        if counts["start"] is not None:
            counts["real"] += sum(lengths)
            counts["padded"] += batch["input_ids"].numel()
            counts["batches"] += 1
            counts["work"] += micro_work[-1][0]
        return batch

    class Clock(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kwargs):
            counts["fit_start"] = time.perf_counter()

        def on_substep_end(self, targs, state, control, **kwargs):
            self.micro_batch_ended(control)

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step == 1:
                counts["start"] = time.perf_counter()
                counts["first_step"] = counts["start"] - counts["fit_start"]
            counts["steps"] = state.global_step
            self.micro_batch_ended(control)

        def micro_batch_ended(self, control):
            micro_ends.append(time.perf_counter())
            if bf16 and micro_ends[-1] - counts["fit_start"] > args.seed_bf16_seconds and len(micro_ends) >= 2:
                control.should_training_stop = True

    training_args = TrainingArguments(
        output_dir=root, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=args.steps,
        learning_rate=2e-4, warmup_steps=5, lr_scheduler_type="linear", optim="adamw_8bit", weight_decay=0.01,
        seed=3407, use_cpu=True, report_to=[], logging_steps=1000, save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True, remove_unused_columns=False, bf16=bf16,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=counting_collator,
                      callbacks=[Clock()])
    trainer.train()
    flops = {"shape": ModelShape.of(model.get_base_model().config), "lora": HF_LORA, "precision": "bf16-mixed" if bf16 else "32-true"}
    return {**_hf_result(counts, micro_tokens, micro_ends, bf16, micro_work), **flops}


def _hf_result(counts: dict, micro_tokens: list[int], micro_ends: list[float], bf16: bool, micro_work: list) -> dict:
    if bf16:
        # Micro-batches after the first (warm-up), as the fp32 runs' steps after the first.
        timed = len(micro_ends) - 1
        elapsed = micro_ends[-1] - micro_ends[0]
        works, padded = zip(*micro_work[1:len(micro_ends)])
        return {"tokens_per_s": sum(micro_tokens[1:len(micro_ends)]) / elapsed,
                "padding_efficiency": float("nan"), "seconds": elapsed, "steps": timed / 4,
                "first_step": micro_ends[0] - counts["fit_start"], "micro_batches": timed,
                "work": sum(works[1:], works[0]), "micro_positions": sum(padded) / timed}
    elapsed = time.perf_counter() - counts["start"]
    # The collator runs one batch ahead of the step that uses it: the last counted batch is the
    # first of a step never run when max_steps ends. Close enough over 7 steps of 8 batches; the
    # exact count would need hooks inside the Trainer's loop. The FLOPs count the same batches.
    return {"tokens_per_s": counts["real"] / elapsed, "padding_efficiency": counts["real"] / counts["padded"],
            "seconds": elapsed, "steps": counts["steps"] - 1, "first_step": counts["first_step"],
            "work": counts["work"], "micro_positions": counts["padded"] / max(counts["batches"], 1)}


def print_utilisation(results: dict) -> None:
    """Per run: its FLOPs per optimizer step (amzft.training.flops, at the rows' real lengths),
    the GFLOP/s achieved over the timed steps, and their share of torch.mm's rate at the run's
    shapes, in fp32 and (with AVX512-BF16 or AMX) bf16, the run's own precision starred; then
    each run's FLOPs by part."""
    from amzft.training.flops import step_flops  # noqa: PLC0415 - after force_offline (module doc)

    dtypes = {"float32": "fp32", **({"bfloat16": "bf16"} if has_bf16_matmul() else {})}
    rates: dict[tuple, float] = {}  # (positions, hidden, intermediate, dtype) -> GFLOP/s, each measured once
    print("\nUtilisation: a step's FLOPs from the model's shapes at the rows' real lengths (amzft.training.flops), "
          "achieved GFLOP/s over the timed steps, and their share of torch.mm's GFLOP/s at an MLP projection's "
          "shape (a micro-batch's mean positions x hidden @ hidden x intermediate); * the run's own precision")
    print(f"{'run':<26}{'precision':>11}{'GFLOP/step':>12}{'GFLOP/s':>9}"
          + "".join(f"{name + ' mm GFLOP/s':>17}{'share':>9}" for name in dtypes.values()))
    breakdown = {}
    for run, r in results.items():
        if not r["seconds"]:
            print(f"{run:<26}no timed steps (run more --steps)")
            continue
        flops = step_flops(r["shape"], r["lora"]["r"], r["lora"]["target_modules"], r["work"])
        achieved = flops.total / r["seconds"] / 1e9
        own = "bfloat16" if "bf16" in r["precision"] else "float32"
        line = f"{run:<26}{r['precision']:>11}{flops.total / r['steps'] / 1e9:>12.1f}{achieved:>9.1f}"
        for dtype in dtypes:
            shape = (max(1, round(r["micro_positions"])), r["shape"].hidden, r["shape"].intermediate, dtype)
            if shape not in rates:
                rates[shape] = gemm_rate(*shape[:3], dtype=dtype)
            line += f"{rates[shape]:>17.1f}{achieved / rates[shape]:>8.1%}{'*' if dtype == own else ' '}"
        print(line)
        breakdown[run] = flops
    print("FLOPs by part (share of the step):")
    for run, flops in breakdown.items():
        parts = ", ".join(f"{part.replace('_forward', ' fwd').replace('_backward', ' bwd')} {n / flops.total:.1%}"
                          for part, n in flops.parts().items())
        print(f"  {run}: {parts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="trn.json-style file (default: the bundled sample)")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--seed-bf16-seconds", type=float, default=180,
                        help="also run HF Trainer with the seed's bf16=True for about this long "
                        "(timed per micro-batch; 0: skip)")
    parser.add_argument("--layouts", default="plain,cpu.yaml",
                        help="data.batches.layout values; '+share' adds data.batches.share_prefix=true (packed), "
                        "'+compile' model.compute.compile=true, '+bf16' trainer.precision=bf16-mixed, e.g. packed+share+compile; "
                        "cpu.yaml: the shipped config as it is")
    args = parser.parse_args()

    force_offline()
    quiet_libraries()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = {}
    with tempfile.TemporaryDirectory() as root:
        results["HF Trainer + PEFT"] = run_hf_trainer(args, os.path.join(root, "hf"))
        for layout in args.layouts.split(","):
            results[f"amzft {layout}"] = run_amzft(args, layout, os.path.join(root, layout))
        if args.seed_bf16_seconds > 0:
            results["HF Trainer, bf16=True"] = run_hf_trainer(args, os.path.join(root, "hf-bf16"), bf16=True)
    base = results["HF Trainer + PEFT"]["tokens_per_s"]
    print(f"\nCPU: {cpu_name()} ({cpu_flags()}), {time.strftime('%Y-%m-%d')}")
    print(f"{args.steps} optimizer steps each (timed from the end of step 1), batch 2 x accumulate 4, "
          "fp32 unless the run says otherwise (cpu.yaml: its precision: auto), "
          f"data: {args.data or 'bundled sample'}, model: {args.model}")
    print(f"{'run':<26}{'real tokens/s':>15}{'padding eff.':>14}{'vs HF Trainer':>15}{'first step s':>14}")
    for name, r in results.items():
        print(f"{name:<26}{r['tokens_per_s']:>15.1f}{r['padding_efficiency']:>14.2f}"
              f"{r['tokens_per_s'] / base:>14.2f}x{r['first_step']:>14.1f}")
    print("(first step: from the start of training to the end of optimizer step 1, compilation included; "
          "not in tokens/s)")
    if "HF Trainer, bf16=True" in results:
        r = results["HF Trainer, bf16=True"]
        print(f"HF Trainer, bf16=True: the seed's own arguments, stopped after --seed-bf16-seconds "
              f"{args.seed_bf16_seconds:g}: {r['micro_batches']} micro-batches timed after the first "
              f"(first micro-batch {r['first_step']:.1f} s); its first-step column is that first micro-batch")
    print_utilisation(results)


if __name__ == "__main__":
    main()
