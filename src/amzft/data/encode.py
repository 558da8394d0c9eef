"""Encode stage, tokens: prompt and response tokenised separately, so the label mask is exactly the prompt length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

IGNORE_INDEX = -100


class Encoded(NamedTuple):
    input_ids: list[int]
    prompt_len: int
    truncated: bool


def encode_texts(tokenizer, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    """Batch-encode with the Rust tokenizer directly: parallel, without Python-side masks and BatchEncoding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=add_special_tokens)]
    return tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]


class PromptEncoder:
    """Tokenises prompts with the template's fixed head (before ``{instruction}``) tokenised once. Correct only where the
    tokenizer splits there: the first call compares with whole prompts and, on any difference, uses them from then on."""

    PROBE = 512

    def __init__(self, tokenizer, prompt_format):
        self.tokenizer, self.format = tokenizer, prompt_format
        self.head = prompt_format.template.partition("{instruction}")[0]
        self.head_ids = encode_texts(tokenizer, [self.head], True)[0] if self.head else []
        self.split_ok: bool | None = None if self.head else False

    def _split(self, prompts: list[str]) -> list[list[int]]:
        n = len(self.head)
        return [self.head_ids + ids for ids in encode_texts(self.tokenizer, [p[n:] for p in prompts], False)]

    def __call__(self, titles: Sequence[str]) -> list[list[int]]:
        prompts = [self.format.render(t) for t in titles]
        if self.split_ok is None:
            probe = prompts[: self.PROBE]
            self.split_ok = self._split(probe) == encode_texts(self.tokenizer, probe, True)
        if self.split_ok:
            return self._split(prompts)
        return encode_texts(self.tokenizer, prompts, True)


def join_example(prompt_ids: list[int], response_ids: list[int], eos_id: int, max_length: int) -> Encoded | None:
    """Prompt + response + EOS, cut to ``max_length`` keeping the whole prompt. A cut response gets no EOS (stopping
    mid-sentence must not be learnt); None when no response token fits (all labels masked: a NaN loss)."""
    room = max_length - len(prompt_ids)
    if room < 1 or not response_ids:
        return None
    full = response_ids + [eos_id]
    if len(full) <= room:
        return Encoded(prompt_ids + full, len(prompt_ids), False)
    return Encoded(prompt_ids + response_ids[:room], len(prompt_ids), True)
