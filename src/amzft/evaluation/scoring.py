"""Scores for generated descriptions: ROUGE-1/2/L, BLEU and chrF (torchmetrics), and failure views
saying *how* answers go wrong (empty, title only, never stopped, looping, collapsed, facts invented)."""

from __future__ import annotations

import re
from collections import Counter

import torch
from torchmetrics.functional.text.rouge import rouge_score
from torchmetrics.text import CHRFScore, SacreBLEUScore

from amzft.data.split import product_key

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_NAME = re.compile(r"\b[A-Z][a-z]{2,}(?:\s+[A-Z][a-z]+)*")
_WORD = re.compile(r"\w+")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def rouge_per_pair(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F1 of each answer against its own reference (rougeL: what the paired bootstrap resamples)."""
    pairs = [rouge_score(p, r, rouge_keys=ROUGE_KEYS, use_stemmer=False) for p, r in zip(predictions, references)]
    return {key: [float(pair[f"{key}_fmeasure"]) for pair in pairs] for key in ROUGE_KEYS}


def overlap_scores(predictions: list[str], references: list[str], rouge: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (of ``rouge``: ``rouge_per_pair``, if computed), corpus BLEU (13a tokens) and chrF."""
    rouge = rouge_per_pair(predictions, references) if rouge is None else rouge
    refs = [[r] for r in references]
    # A float32 mean of the per-pair F1s: what torchmetrics' corpus ROUGEScore computes.
    return {key: float(torch.tensor(rouge[key]).mean()) for key in ROUGE_KEYS} | {
        "bleu": float(SacreBLEUScore(tokenize="13a")(predictions, refs)), "chrf": float(CHRFScore()(predictions, refs))}


def is_looping(text: str, n: int = 4, repeats: int = 3) -> bool:
    """The same sentence twice, or one word n-gram three times or more."""
    sentences = [s.strip().lower() for s in _SENTENCE_END.split(text) if len(s.split()) >= 3]
    if len(sentences) != len(set(sentences)):
        return True
    words = _WORD.findall(text.lower())
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= repeats


def collapsed_share(texts: list[str], products: list[str] | None = None, min_words: int = 4, n: int = 8) -> float:
    """Share of answers sharing their first sentence (of ``min_words`` or more) or a word ``n``-gram with another
    ``products``' answer (default: each its own): mode collapse, which per-answer views do not see."""
    products = products if products is not None else [str(i) for i in range(len(texts))]
    keys: list[set] = []
    owners: dict = {}  # a first sentence or n-gram -> the products whose answers hold it
    for text, product in zip(texts, products):
        first = " ".join(_SENTENCE_END.split(text.strip(), maxsplit=1)[0].lower().split())
        words = _WORD.findall(text.lower())
        own = {("sentence", first)} if len(first.split()) >= min_words else set()
        own |= {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
        keys.append(own)
        for key in own:
            owners.setdefault(key, set()).add(product)
    collapsed = sum(any(len(owners[key]) > 1 for key in own) for own in keys)
    return collapsed / len(texts) if texts else 0.0


def is_title_only(answer: str, title: str) -> bool:
    """The answer says nothing beyond the product's own title words."""
    answer_words = set(_WORD.findall(answer.lower())) - {"the", "a", "an", "of", "is", "and", "product", "description", "this"}
    return bool(answer_words) and answer_words <= set(_WORD.findall(title.lower()))


def _facts(text: str) -> set[str]:
    """Numbers and capitalised names; a lone capitalised word that starts a sentence is not a name."""
    names = {m.group(0) for m in _NAME.finditer(text)
             if " " in m.group(0) or not (m.start() == 0 or text[: m.start()].rstrip().endswith((".", "!", "?")))}
    return set(_NUMBER.findall(text)) | names


def failure_views(answers, titles: list[str], references: list[str]) -> dict[str, float]:
    """Shares over the answers (objects with ``text``, ``stopped``, ``new_tokens``)."""
    n = max(len(answers), 1)
    facts = [(_facts(a.text), _facts(ref)) for a, ref in zip(answers, references)]
    recalled = sum(len(got & want) for got, want in facts)
    ref_facts, ans_facts = sum(len(want) for _, want in facts), sum(len(got) for got, _ in facts)
    return {
        "empty": sum(not a.text for a in answers) / n,
        "title_only": sum(is_title_only(a.text, t) for a, t in zip(answers, titles)) / n,
        "never_stopped": sum(not a.stopped for a in answers) / n,
        "looping": sum(is_looping(a.text) for a in answers) / n,
        "collapsed": collapsed_share([a.text for a in answers], [product_key(t) for t in titles]),
        "facts_recalled": recalled / ref_facts if ref_facts else 0.0,  # reference numbers/names reproduced
        "facts_invented": (ans_facts - recalled) / ans_facts if ans_facts else 0.0,  # answer numbers/names not in the reference
        "mean_new_tokens": sum(a.new_tokens for a in answers) / n,
    }
