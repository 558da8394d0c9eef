"""Scores for generated descriptions: overlap metrics (torchmetrics) and failure views.

Overlap: ROUGE-1/2/L F1, corpus BLEU (sacreBLEU's 13a tokenisation) and chrF, all from
torchmetrics. Failure views say *how* answers go wrong, which overlap scores hide: empty,
title only, never stopped (hit max_new_tokens), looping (repeated sentence or 4-gram), collapsed
(the answer shares its first sentence or a word 8-gram with another product's answer: the
model says the same thing whatever the product), and how many of the reference's numbers and
capitalised names the answer reproduces versus invents.
"""

from __future__ import annotations

import re
from collections import Counter

from torchmetrics.functional.text.rouge import rouge_score
from torchmetrics.text import CHRFScore, SacreBLEUScore
from torchmetrics.text.rouge import ROUGEScore

from amzft.data.split import product_key

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_NAME = re.compile(r"\b[A-Z][a-z]{2,}(?:\s+[A-Z][a-z]+)*")
_WORD = re.compile(r"\w+")


def overlap_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    rouge = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"), use_stemmer=False)
    scores = {k: float(v) for k, v in rouge(predictions, references).items() if k.endswith("_fmeasure")}
    bleu = SacreBLEUScore(tokenize="13a")
    chrf = CHRFScore()
    refs = [[r] for r in references]
    return {
        "rouge1": scores["rouge1_fmeasure"],
        "rouge2": scores["rouge2_fmeasure"],
        "rougeL": scores["rougeL_fmeasure"],
        "bleu": float(bleu(predictions, refs)),
        "chrf": float(chrf(predictions, refs)),
    }


def rouge_l_per_pair(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 of each answer against its own reference: the per-product scores a paired
    bootstrap resamples (amzft.evaluation.bootstrap). Their mean is ``overlap_scores``' rougeL
    (torchmetrics' corpus ROUGE averages these same per-pair F1s)."""
    return [float(rouge_score(p, r, rouge_keys="rougeL", use_stemmer=False)["rougeL_fmeasure"])
            for p, r in zip(predictions, references)]


def is_looping(text: str, n: int = 4, repeats: int = 3) -> bool:
    """The same sentence twice, or one word n-gram three times or more."""
    sentences = [s.strip().lower() for s in _SENTENCE_END.split(text) if len(s.split()) >= 3]
    if len(sentences) != len(set(sentences)):
        return True
    words = _WORD.findall(text.lower())
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= repeats


def collapsed_share(texts: list[str], products: list[str] | None = None, min_words: int = 4, n: int = 8) -> float:
    """Share of answers that share their first sentence (lower-cased, whitespace collapsed, at
    least ``min_words`` words, so a bare "The." does not count) or any word ``n``-gram with the
    answer of another product (``products``: one key per answer, default: every answer is its
    own product; answers of one product may agree). Mode collapse: the same text whatever the
    question, which per-answer views (looping, invented) do not see."""
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
    names = set()
    for m in _NAME.finditer(text):
        starts_sentence = m.start() == 0 or text[: m.start()].rstrip().endswith((".", "!", "?"))
        if not (starts_sentence and " " not in m.group(0)):
            names.add(m.group(0))
    return set(_NUMBER.findall(text)) | names


def failure_views(answers, titles: list[str], references: list[str]) -> dict[str, float]:
    """Shares over the answers (``answers`` are generate.Answer objects)."""
    n = max(len(answers), 1)
    recalled = invented = ref_facts = ans_facts = 0
    for a, ref in zip(answers, references):
        got, want = _facts(a.text), _facts(ref)
        recalled += len(got & want)
        ref_facts += len(want)
        ans_facts += len(got)
        invented += len(got - want)
    return {
        "empty": sum(not a.text for a in answers) / n,
        "title_only": sum(is_title_only(a.text, t) for a, t in zip(answers, titles)) / n,
        "never_stopped": sum(not a.stopped for a in answers) / n,
        "looping": sum(is_looping(a.text) for a in answers) / n,
        "collapsed": collapsed_share([a.text for a in answers], [product_key(t) for t in titles]),
        "facts_recalled": recalled / ref_facts if ref_facts else 0.0,  # reference numbers/names reproduced
        "facts_invented": invented / ans_facts if ans_facts else 0.0,  # answer numbers/names not in the reference
        "mean_new_tokens": sum(a.new_tokens for a in answers) / n,
    }
