"""Greedy answers from a trained (or base) model, and rebuilding a model from a checkpoint."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from amzft.data.prompt import ALPACA_TEMPLATE, SEED_QUESTION, PromptFormat


def prompt_format_from(hparams: dict | None) -> PromptFormat:
    hparams = hparams or {}
    return PromptFormat(
        question=hparams.get("question", SEED_QUESTION),
        template=hparams.get("template", ALPACA_TEMPLATE),
        input_text=hparams.get("input_text", ""),
    )


def load_trained(ckpt_path: str | Path):
    """Rebuild base model + adapter from a checkpoint's saved hyper-parameters.

    Returns the module (adapter loaded, eval mode) and the prompt format it was trained with.
    """
    from amzft.checkpointing import load_checkpoint_file
    from amzft.model import LoraCausalLM

    checkpoint = load_checkpoint_file(ckpt_path)
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    module = LoraCausalLM(**hparams)
    module.configure_model()
    module.check_adapter_state(checkpoint["state_dict"])
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    module.eval()
    return module, prompt_format_from(checkpoint.get("datamodule_hyper_parameters"))


def generate_answers(
    module,
    titles: list[str],
    prompt_format: PromptFormat,
    max_new_tokens: int = 128,
    use_adapter: bool = True,
    batch_size: int = 8,
) -> list[str]:
    """Answers to the question about each title, in the prompt format the model was trained on."""
    prompts = [prompt_format.render(t) for t in titles]
    return generate_from_prompts(module, prompts, max_new_tokens, use_adapter, batch_size)


@torch.no_grad()
def generate_from_prompts(
    module,
    prompts: list[str],
    max_new_tokens: int = 128,
    use_adapter: bool = True,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers, batched with left padding; each row stops at its own EOS.

    ``use_adapter=False`` switches the LoRA adapter off (peft's disable_adapter), so base and
    fine-tuned answers come from one loaded model.
    """
    tokenizer, model = module.tokenizer, module.model
    was_training = model.training
    model.eval()
    answers: list[str] = []
    switch = contextlib.nullcontext() if use_adapter else model.disable_adapter()
    try:
        with switch:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                # Same tokenisation as training: the whole prompt, with the tokenizer's specials.
                ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in chunk]
                width = max(map(len, ids))
                input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
                for row, seq in enumerate(ids):
                    input_ids[row, width - len(seq) :] = torch.tensor(seq)
                    attention_mask[row, width - len(seq) :] = 1
                device = next(model.parameters()).device
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
                for row in out[:, width:]:
                    answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers
