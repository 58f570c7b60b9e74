"""Answering LLaVA question files (format, resume, torn lines, chunks, bad lines and images), the VQA
scoring against the official metric's documented cases, and the movekd generate/answer/evaluate CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from cache.manifest import PreprocessSpec
from jobs.cli import main as movekd
from student.answer import answer_file, answered_ids, get_chunk
from student.export import export_pretrained, load_pretrained
from student.generate import GenerationConfig, generate
from student.model import build_student
from student.tiny import make_tiny_llava_parts
from student.vqa_eval import exact_match, normalize_answer, score_answers, vqa_accuracy
from tests.student._trainer_fixtures import tiny_config, tiny_manifest

SPEC = PreprocessSpec(resolution=56)
CFG = GenerationConfig(max_new_tokens=5)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("answer")
    parts = make_tiny_llava_parts(root / "parts")
    model = build_student(tiny_config(parts, root / "run"), tiny_manifest()).eval()
    tok = AutoTokenizer.from_pretrained(parts.tokenizer)
    inference = {"template": "vicuna_v1", "preprocess": SPEC.to_dict()}
    return export_pretrained(model, root / "export", tok, inference)


@pytest.fixture(scope="module")
def loaded(export):
    return load_pretrained(export), AutoTokenizer.from_pretrained(export / "tokenizer")


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    lines = [
        {"question_id": 10, "image": "a.jpg", "text": "What is it?", "category": "x", "answers": ["cat"]},
        {"question_id": 11, "image": "b.png", "text": "Is it red?", "answers": ["yes"]},
        {"question_id": 12, "text": "Tell me a joke.", "answers": ["no"]},
        {"question_id": 13, "image": "broken.jpg", "text": "What?", "answers": ["x"]},
        {"question_id": 14, "image": "missing.jpg", "text": "What?", "answers": ["x"]},
    ]
    text = "\n".join(json.dumps(x) for x in lines[:2]) + "\n{not json\n" + "\n".join(json.dumps(x) for x in lines[2:])
    (root / "q.jsonl").write_text(text + '\n{"text": "no id"}\n')
    return root


def read(path):
    return [json.loads(line) for line in open(path)]


def test_answers_are_llava_lines_equal_to_generate(loaded, questions, tmp_path):
    model, tok = loaded
    out = tmp_path / "answers.jsonl"
    s = answer_file(model, tok, questions / "q.jsonl", questions, out, SPEC, "vicuna_v1", "Answer briefly.", CFG)
    assert (s.answered, s.skipped, len(s.failed)) == (3, 0, 4)
    why = "\n".join(s.failed)
    assert "line 3: not JSON" in why and "line 7: no 'question_id'" in why
    assert (
        "question 13: image" in why
        and "cannot be decoded" in why
        and "question 14: image" in why
        and "not found" in why
    )
    rows = read(out)
    assert [r["question_id"] for r in rows] == [10, 11, 12]
    assert all(set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for r in rows)
    assert rows[0]["prompt"] == "What is it?\nAnswer briefly."
    images = [Image.open(questions / "a.jpg"), Image.open(questions / "b.png"), None]
    want = generate(model, tok, [r["prompt"] for r in rows], images, SPEC, "vicuna_v1", CFG)
    assert [r["text"] for r in rows] == want


def test_resume_skips_answered_and_drops_a_torn_line(loaded, questions, tmp_path):
    model, tok = loaded
    out = tmp_path / "answers.jsonl"
    answer_file(model, tok, questions / "q.jsonl", questions, out, SPEC, config=CFG, num_chunks=2, chunk_idx=0)
    first = read(out)
    assert [r["question_id"] for r in first] == [10, 11, 12]  # chunk 0 of 2: ceil(5/2) = 3 questions
    with open(out, "a") as f:
        f.write('{"question_id": 99, "prom')  # a crash mid-line
    assert answered_ids(out) == {10, 11, 12} and out.read_text().endswith("}\n")
    s = answer_file(model, tok, questions / "q.jsonl", questions, out, SPEC, config=CFG)
    assert (s.answered, s.skipped) == (0, 3)
    assert read(out) == first


def test_chunks_are_llavas():
    items = list(range(10))
    assert [get_chunk(items, 3, i) for i in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert get_chunk([], 4, 2) == []
    with pytest.raises(ValueError, match="chunk_idx"):
        get_chunk(items, 2, 2)


def test_vqa_normalisation_and_accuracy():
    # cases from the VQA evaluation's rules: articles, number words, punctuation, decimals
    assert normalize_answer("The Two dogs!") == "2 dogs"
    assert normalize_answer("yes.") == "yes" and normalize_answer("3.5") == "3.5"
    assert normalize_answer("1,000") == "1000" and normalize_answer("black/white") == "black white"
    assert normalize_answer("dont know") == "don't know"
    refs = ["cat"] * 3 + ["dog"] * 7
    assert vqa_accuracy("cat", refs) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # leave-one-out over 10
    refs2 = ["cat"] * 2 + ["dog"] * 8
    assert vqa_accuracy("a cat", refs2) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy("bird", refs2) == 0.0
    assert exact_match("Coffee.", ["coffee", "latte"]) == 1.0 and exact_match("tea", ["coffee"]) == 0.0


def test_score_file(questions, tmp_path):
    ans = tmp_path / "a.jsonl"
    ans.write_text(
        json.dumps({"question_id": 10, "text": "Cat."}) + "\n" + json.dumps({"question_id": 12, "text": "x"})
    )
    good = tmp_path / "q.jsonl"
    good.write_text(
        "".join(json.dumps(json.loads(x)) + "\n" for x in (questions / "q.jsonl").read_text().splitlines()[:2])
    )
    scores = score_answers(good, ans)
    assert scores["overall"] == {"count": 1, "vqa_accuracy": 100.0, "exact_match": 100.0} and scores["missing"] == 1


def test_cli(export, questions, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    assert movekd(["answer", "--model", str(export), "--questions", str(questions / "q.jsonl"),
                   "--image-folder", str(questions), "--out", str(out), "--max-new-tokens", "5"]) == 0  # fmt: skip
    assert "answered 3, skipped 0" in capsys.readouterr().out
    assert movekd(["evaluate", "--questions", str(questions / "q.jsonl"), "--answers", str(out)]) == 2
    assert "line 3" in capsys.readouterr().err  # the question file with a bad line cannot be scored

    model, tok = load_pretrained(export), AutoTokenizer.from_pretrained(export / "tokenizer")
    torch.manual_seed(0)
    assert movekd(["generate", "--model", str(export), "--image", str(questions / "a.jpg"),
                   "--prompt", "What is it?", "--max-new-tokens", "5"]) == 0  # fmt: skip
    want = generate(model, tok, ["What is it?"], [Image.open(questions / "a.jpg")], SPEC, "vicuna_v1", CFG)[0]
    assert capsys.readouterr().out.strip() == want


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--model", "/nope", "--prompt", "q"], "/nope: no such folder"),
        (["generate", "--model", "{export}", "--prompt", "q", "--template", "llama9"], "unknown template 'llama9'"),
        (["generate", "--model", "{export}", "--prompt", "q", "--image", "/nope.jpg"], "/nope.jpg not found"),
        (["answer", "--model", "{export}", "--questions", "/nope.jsonl", "--out", "x"], "/nope.jsonl: no such file"),
        (["evaluate", "--questions", "/q", "--answers", "/a"], "--questions /q: no such file"),
    ],
)
def test_cli_errors_are_one_line(export, argv, message, capsys):
    assert movekd([a.replace("{export}", str(export)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_inference_loading_gives_a_tokenizer_without_pad_unk(export, tmp_path):
    """An export whose tokenizer has no pad token (vicuna's) loads with ``pad = unk``, as LLaVA."""
    from jobs.inference import load_for_inference

    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    config_path = copy / "tokenizer" / "tokenizer_config.json"
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if k != "pad_token"}
    config_path.write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(copy / "tokenizer").pad_token is None
    tokenizer = load_for_inference(str(copy), None)[1]
    assert tokenizer.pad_token is not None and tokenizer.pad_token == tokenizer.unk_token


def test_incompatible_export_version(export, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(export, old)
    meta = json.loads((old / "movekd_student.json").read_text())
    (old / "movekd_student.json").write_text(json.dumps({**meta, "format_version": 99}))
    assert movekd(["generate", "--model", str(old), "--prompt", "q"]) == 2
    assert "re-export it" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["generate", "answer", "evaluate"])
def test_help(verb):
    out = subprocess.run([sys.executable, "-m", "jobs.cli", verb, "--help"], capture_output=True, text=True, check=True)
    assert "--" in out.stdout and ("--model" in out.stdout or verb == "evaluate")
