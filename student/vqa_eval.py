"""Scoring answers: the VQA answer normalisation and accuracy, and exact match.

Decisions:
- ``normalize_answer`` follows the official VQA evaluation (``vqaEval.py``, used by LLaVA's
  ``m4c_evaluator.EvalAIAnswerProcessor``): lower case, punctuation removed (a period only when
  not between digits, a comma inside a number dropped), number words -> digits, articles dropped,
  a few contractions restored. Written here because the official code is a script, not a package.
- ``vqa_accuracy``: min(#annotators who gave the answer / 3, 1), averaged over the 10 leave-one-out
  subsets of the annotators when there are 10, as the official metric; with fewer annotations it
  is min(matches / 3, 1) over all of them (and 1/0 for a single reference).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from itertools import combinations

_CONTRACTIONS = {
    "dont": "don't",
    "doesnt": "doesn't",
    "isnt": "isn't",
    "arent": "aren't",
    "cant": "can't",
    "wont": "won't",
    "im": "i'm",
    "ive": "i've",
    "thats": "that's",
    "whats": "what's",
    "wasnt": "wasn't",
    "didnt": "didn't",
    "couldnt": "couldn't",
    "shouldnt": "shouldn't",
    "wouldnt": "wouldn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "youre": "you're",
    "theyre": "they're",
    "itsnt": "it isn't",
}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_NUMBER, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _punctuation(text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers."""
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if len(refs) < 10:
        return min(sum(r == pred for r in refs) / 3.0, 1.0) if len(refs) > 1 else float(refs[0] == pred)
    scores = [min(sum(r == pred for r in subset) / 3.0, 1.0) for subset in combinations(refs, len(refs) - 1)]
    return sum(scores) / len(scores)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from None


def score_answers(questions_path, answers_path) -> dict:
    """Score an answers file (LLaVA format) against the ``answers`` lists of a question file.

    Returns ``{"overall": {...}, "by_category": {cat: {...}}, "missing": n}`` with ``count``,
    ``vqa_accuracy`` and ``exact_match`` (percentages) per group."""
    refs, cats = {}, {}
    for n, rec in _jsonl(questions_path):
        if not isinstance(rec, dict) or not isinstance(rec.get("answers"), list) or not rec["answers"]:
            raise ValueError(f"{questions_path} line {n}: no 'answers' list to score against")
        refs[rec["question_id"]] = [str(a) for a in rec["answers"]]
        cats[rec["question_id"]] = rec.get("category", "all")
    preds = {}
    for n, rec in _jsonl(answers_path):
        if not isinstance(rec, dict) or "question_id" not in rec:
            raise ValueError(f"{answers_path} line {n}: not an answer record (no 'question_id')")
        preds[rec["question_id"]] = str(rec.get("text", ""))
    groups: dict[str, list[tuple[float, float]]] = {}
    for qid, answers in refs.items():
        if qid in preds:
            pair = (vqa_accuracy(preds[qid], answers), exact_match(preds[qid], answers))
            groups.setdefault("overall", []).append(pair)
            groups.setdefault(f"category:{cats[qid]}", []).append(pair)

    def table(pairs):
        n = len(pairs)
        return {
            "count": n,
            "vqa_accuracy": 100.0 * sum(p[0] for p in pairs) / n if n else 0.0,
            "exact_match": 100.0 * sum(p[1] for p in pairs) / n if n else 0.0,
        }

    return {
        "overall": table(groups.get("overall", [])),
        "by_category": {k.split(":", 1)[1]: table(v) for k, v in sorted(groups.items()) if k != "overall"},
        "missing": len(set(refs) - set(preds)),
    }
