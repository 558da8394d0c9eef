"""Answers from a trained (or base) model: batched, left-padded, each row stopping at its own EOS,
decoded with ``amzft.model.decoding``'s options (``DEFAULT_DECODING`` unless told otherwise)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from transformers.integrations import sdpa_attention

from amzft.model.backends import set_mode
from amzft.model.decoding import DEFAULT_DECODING, GREEDY, GenerationOptions

if TYPE_CHECKING:  # a type only: the model does not import the data pipeline, its caller hands the format in
    from amzft.data.prompt import PromptFormat

__all__ = ["DEFAULT_DECODING", "GREEDY", "Answer", "GenerationOptions", "generate", "generate_answers", "generate_ids"]


@dataclass
class Answer:
    text: str
    new_tokens: int  # generated tokens, EOS included
    stopped: bool  # ended with EOS before max_new_tokens


def generate_answers(module, titles: list[str], prompt_format: PromptFormat, max_new_tokens: int = 128,
                     use_adapter: bool = True, batch_size: int = 8, options: GenerationOptions | None = None) -> list[str]:
    """Answers about each title in the training prompt format, ``options`` capped at ``max_new_tokens``."""
    prompts = [prompt_format.render(t) for t in titles]
    options = replace(options or DEFAULT_DECODING, max_new_tokens=max_new_tokens)
    return [a.text for a in generate(module, prompts, options, use_adapter, batch_size)]


def generate(module, prompts: list[str], options: GenerationOptions | None = None, use_adapter: bool = True,
             batch_size: int = 8) -> list[Answer]:
    """Batched generation; ``use_adapter=False`` switches the adapter off, so base and fine-tuned
    answers come from one loaded model."""
    tokenizer = module.tokenizer
    answers: list[Answer] = []
    for start in range(0, len(prompts), batch_size):
        # Same tokenisation as training: the whole prompt, with the tokenizer's specials.
        ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[start : start + batch_size]]
        answers += generate_ids(module, ids, options, use_adapter)
    return answers


@contextlib.contextmanager
def _gqa_sdpa_on_cpu():
    """Let SDPA share key/value heads (``enable_gqa``) on CPU even with a padding mask, while generating.
    transformers uses it only without a mask (a mask sends CUDA to the slow kernel) and else copies
    the whole KV cache per step; on CPU GQA gives the same bits faster (tests/test_generate.py)."""
    original = sdpa_attention.use_gqa_in_sdpa

    def use_gqa(attention_mask, key, value) -> bool:
        if key.device.type == "cpu":
            return key.shape[-1] == value.shape[-1] <= 256
        return original(attention_mask, key, value)

    sdpa_attention.use_gqa_in_sdpa = use_gqa
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original


@torch.no_grad()
def generate_ids(module, ids: list[list[int]], options: GenerationOptions | None = None,
                 use_adapter: bool = True) -> list[Answer]:
    """One batch of tokenised prompts, left-padded, generated together, each row stopping at its own EOS."""
    options = options or DEFAULT_DECODING
    tokenizer, model = module.tokenizer, module.model
    backend = getattr(module, "hparams", {}).get("backend", "hf")
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    set_mode(backend, model, training=False)
    # A plain base model (amzft.inference.load.plain_base) has no adapter to switch off.
    switch = contextlib.nullcontext() if use_adapter or not hasattr(model, "disable_adapter") else model.disable_adapter()
    if options.do_sample:
        torch.manual_seed(options.seed)
    try:
        # Compiled layers would recompile for every new KV-cache length: generation runs them eagerly.
        with switch, torch.compiler.set_stance("force_eager"), _gqa_sdpa_on_cpu():
            width, device = max(map(len, ids)), next(model.parameters()).device
            input_ids = [[tokenizer.pad_token_id] * (width - len(seq)) + list(seq) for seq in ids]
            attention_mask = [[0] * (width - len(seq)) + [1] * len(seq) for seq in ids]
            out = model.generate(input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
                                 attention_mask=torch.tensor(attention_mask, dtype=torch.long, device=device),
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **options.generate_kwargs())
    finally:
        model.train(was_training)
        if was_training:
            set_mode(backend, model, training=True)
    answers = []
    for row in out[:, width:].tolist():
        stopped = eos in row
        tokens = row[: row.index(eos)] if stopped else row
        answers.append(Answer(tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens) + stopped, stopped))
    return answers
