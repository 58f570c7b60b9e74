"""``movekd generate``, ``movekd answer`` and ``movekd evaluate``: use a trained (exported) student.

- ``generate``: answer one prompt (optionally about one image) and print the answer.
- ``answer``: answer a LLaVA-format question file into a LLaVA-format answers file (resumable,
  ``--num-chunks/--chunk-idx`` like LLaVA's ``model_vqa_loader.py``; under ``torchrun`` each rank
  takes its own chunk and writes ``ANSWERS.rankN.jsonl``).
- ``evaluate``: score an answers file against a question file that carries reference ``answers``
  (VQA accuracy and exact match, overall and per category).

The template and the student's preprocessing come from the export (``movekd_student.json``
``inference``, written by ``movekd train``); ``--template`` overrides the template.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PROG = "movekd"


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="EXPORT_DIR", help="a student export (movekd train's export/)")
    p.add_argument(
        "--template",
        default=None,
        metavar="NAME",
        help="conversation template (plain, vicuna_v1; default: the one the model was trained with)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer length cap (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default, LLaVA's eval)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling when temperature > 0")
    p.add_argument("--num-beams", type=int, default=1, metavar="B", help="beam search width (default 1)")
    p.add_argument("--seed", type=int, default=0, help="torch seed for sampling (default 0)")


def add_parser(subparsers) -> None:
    g = subparsers.add_parser("generate", help="answer one prompt with a trained student", description=__doc__)
    _model_args(g)
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the question")
    g.add_argument("--image", action="append", default=None, metavar="FILE", help="an image (repeat for a batch)")
    g.set_defaults(func=run_generate)

    a = subparsers.add_parser("answer", help="answer a LLaVA question file (jsonl)", description=__doc__)
    _model_args(a)
    a.add_argument("--questions", required=True, metavar="FILE.jsonl", help="question_id, image, text[, category]")
    a.add_argument("--image-folder", default="", metavar="DIR", help="folder the questions' image paths are under")
    a.add_argument("--out", required=True, metavar="ANSWERS.jsonl", help="answers file (appended; resumable)")
    a.add_argument(
        "--suffix",
        default="none",
        metavar="NAME|TEXT",
        help="text appended to every question after a newline: short (single word or phrase), option "
        "(multiple choice letter), pope, none (default), or literal text",
    )
    a.add_argument("--num-chunks", type=int, default=1, metavar="N", help="split the questions into N chunks")
    a.add_argument("--chunk-idx", type=int, default=0, metavar="I", help="answer chunk I (0-based)")
    a.add_argument("--batch-size", type=int, default=8, metavar="N", help="questions per generate call (default 8)")
    a.add_argument("--model-id", default=None, help="model_id written per answer (default: the export dir name)")
    a.set_defaults(func=run_answer)

    e = subparsers.add_parser("evaluate", help="score an answers file (VQA accuracy, exact match)", description=__doc__)
    e.add_argument("--questions", required=True, metavar="FILE.jsonl", help="questions with reference 'answers'")
    e.add_argument("--answers", required=True, metavar="ANSWERS.jsonl", help="movekd answer's output")
    e.add_argument("--json", action="store_true", help="print the scores as JSON")
    e.set_defaults(func=run_evaluate)


def load_for_inference(model_dir: str, template: str | None, torch_dtype=None):
    """-> (model, tokenizer, PreprocessSpec, template) from an export; ValueError says what is wrong.

    ``torch_dtype``: the dtype to load the weights in (default: as exported, float32)."""
    from transformers import AutoConfig

    from cache.manifest import PreprocessSpec
    from student.conversation import get_template, load_tokenizer
    from student.export import load_pretrained, read_metadata

    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"--model {model_dir}: no such folder (pass a student export, e.g. RUN/export)")
    meta = read_metadata(path)
    info = meta.get("inference") or {}
    name = get_template(template or info.get("template") or "vicuna_v1").name
    if info.get("preprocess"):
        spec = PreprocessSpec.from_dict(info["preprocess"])
    else:  # exports written before "inference": the tower's size, LLaVA-1.5's stage-2 'pad'
        spec = PreprocessSpec(resolution=int(AutoConfig.from_pretrained(path / "vision").image_size), aspect="pad")
    if not (path / "tokenizer").is_dir():
        raise ValueError(f"{path}: no tokenizer/ in the export (export it with a tokenizer)")
    tokenizer = load_tokenizer(path / "tokenizer")  # pad = unk when it has none, as LLaVA
    return load_pretrained(path, torch_dtype), tokenizer, spec, name


def _gen_config(args):
    from student.generate import GenerationConfig

    return GenerationConfig(args.max_new_tokens, args.temperature, args.num_beams, args.top_p)


def run_generate(args) -> int:
    import torch

    from jobs.cli import user_error
    from student.answer import load_image
    from student.generate import generate

    try:
        cfg = _gen_config(args)
        images = [load_image("", f) for f in args.image] if args.image else [None]
        model, tok, spec, template = load_for_inference(args.model, args.template)
    except ValueError as e:
        return user_error(f"{PROG} generate", e)
    torch.manual_seed(args.seed)
    for image, text in zip(
        args.image or [None], generate(model, tok, [args.prompt] * len(images), images, spec, template, cfg)
    ):
        print(f"{image}: {text}" if image and len(images) > 1 else text)
    return 0


def _rank_out(out: str) -> tuple[str, int, int]:
    """Under torchrun: (per-rank file, rank, world size); otherwise (out, 0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return out, 0, 1
    rank = int(os.environ.get("RANK", "0"))
    stem, ext = os.path.splitext(out)
    return f"{stem}.rank{rank}{ext or '.jsonl'}", rank, world


def run_answer(args) -> int:
    import torch
    from tqdm import tqdm

    from jobs.cli import user_error
    from student.answer import SUFFIXES, answer_file

    if not os.path.isfile(args.questions):
        return user_error(f"{PROG} answer", f"--questions {args.questions}: no such file")
    out, rank, world = _rank_out(args.out)
    num_chunks, chunk_idx = args.num_chunks * world, args.chunk_idx * world + rank
    try:
        cfg = _gen_config(args)
        model, tok, spec, template = load_for_inference(args.model, args.template)
        suffix = SUFFIXES.get(args.suffix, args.suffix)
        torch.manual_seed(args.seed)
        with tqdm(desc="answer", unit="q", disable=rank != 0) as bar:
            summary = answer_file(
                model,
                tok,
                args.questions,
                args.image_folder,
                out,
                spec,
                template,
                suffix,
                cfg,
                args.model_id or Path(args.model).resolve().name,
                num_chunks,
                chunk_idx,
                args.batch_size,
                bar,
            )
    except ValueError as e:
        return user_error(f"{PROG} answer", e)
    print(f"{out}: {summary.format()}")
    return 0


def format_scores(scores: dict) -> str:
    from cache.text import table

    rows = [
        ["overall", scores["overall"]["count"], scores["overall"]["vqa_accuracy"], scores["overall"]["exact_match"]]
    ]
    rows += [[c, t["count"], t["vqa_accuracy"], t["exact_match"]] for c, t in scores["by_category"].items()]
    body = table(
        ["group", "questions", "vqa acc %", "exact %"], [[g, n, f"{v:.1f}", f"{x:.1f}"] for g, n, v, x in rows]
    )
    return body + (f"\n{scores['missing']} question(s) have no answer" if scores["missing"] else "")


def run_evaluate(args) -> int:
    from jobs.cli import user_error
    from student.vqa_eval import score_answers

    for flag, f in (("--questions", args.questions), ("--answers", args.answers)):
        if not os.path.isfile(f):
            return user_error(f"{PROG} evaluate", f"{flag} {f}: no such file")
    try:
        scores = score_answers(args.questions, args.answers)
    except (ValueError, json.JSONDecodeError, KeyError) as e:
        return user_error(f"{PROG} evaluate", e)
    print(json.dumps(scores, indent=2) if args.json else format_scores(scores))
    return 0


if __name__ == "__main__":
    from jobs.cli import main

    sys.exit(main(sys.argv[1:]))
