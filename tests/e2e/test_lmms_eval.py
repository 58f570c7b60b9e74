"""The lmms-eval plugin: the real ``lmms-eval`` CLI (``--model movekd``, found through
``LMMS_EVAL_PLUGINS`` and through the installed entry point) runs a local task defined here (no
downloads) on a tiny student export; its ``generate_until`` answers equal ``student.generate``'s
(the function ``movekd generate`` calls), and its ``loglikelihood`` answers of a multiple-choice
task are ``score_continuation``'s in lmms-eval's convention, whose log-probabilities equal the same
tokens teacher-forced one at a time through the LLM's KV cache (the generation path) rather than
the one full forward the plugin scores with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

pytest.importorskip("lmms_eval", reason="the eval extra (lmms-eval) is not installed")

from cache.manifest import PreprocessSpec  # noqa: E402
from student.conversation import encode_prompt  # noqa: E402
from student.export import export_pretrained, load_pretrained  # noqa: E402
from student.generate import (  # noqa: E402
    GenerationConfig,
    generate,
    generation_prompt,
    score_continuation,
)
from student.model import build_student  # noqa: E402
from student.tiny import make_tiny_llava_parts  # noqa: E402
from tests.student._trainer_fixtures import tiny_config, tiny_manifest  # noqa: E402

pytestmark = pytest.mark.slow  # runs the lmms-eval CLI in a child process

ROOT = Path(__file__).resolve().parents[2]
SPEC = PreprocessSpec(resolution=56)
QUESTIONS = ["What is in the picture?", "Which colour dominates?", "Tell me about the weather.", "Is it a cat?"]

UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")] if doc.get("image") else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].lower())}
"""

GEN_TASK = """task: movekd_test_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  num_beams: 1
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """task: movekd_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: 0
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    parts = make_tiny_llava_parts(root / "parts")
    model = build_student(tiny_config(parts, root / "run"), tiny_manifest()).eval()
    tok = AutoTokenizer.from_pretrained(parts.tokenizer)
    export = export_pretrained(model, root / "export", tok, {"template": "vicuna_v1", "preprocess": SPEC.to_dict()})
    rng = np.random.default_rng(0)
    docs = []
    for i, q in enumerate(QUESTIONS):
        image = None
        if i != 2:  # doc 2 is text-only
            image = root / f"im{i}.png"
            Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 50, 3), dtype=np.uint8)).save(image)
        docs.append({"question": q, "image": str(image) if image else "", "answer": "x"})
    return root, export, docs


def _run_lmms(root: Path, export: Path, task: str, docs: list[dict], plugins: bool) -> list[dict]:
    tasks = root / f"tasks_{task}_{plugins}"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = GEN_TASK if task == "movekd_test_gen" else MC_TASK
    (tasks / f"{task}.yaml").write_text(spec.format(data=tasks / "data.jsonl"))
    out = root / f"out_{task}_{plugins}"
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(root / "hf"),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("LMMS_EVAL_PLUGINS", None)
    if plugins:
        env["LMMS_EVAL_PLUGINS"] = "jobs.lmms_plugin"
    cmd = [sys.executable, "-m", "jobs.cli", "lmms-eval", "--model", "movekd", "--model_args", f"pretrained={export}"]
    cmd += ["--tasks", task, "--include_path", str(tasks), "--batch_size", "2", "--device", "cpu"]
    cmd += ["--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(out.rglob(f"*samples_{task}.jsonl"))
    assert files, f"no samples file under {out}: {sorted(p.name for p in out.rglob('*'))}\n{proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


def _images(docs):
    return [Image.open(d["image"]).convert("RGB") if d["image"] else None for d in docs]


@pytest.mark.parametrize("plugins", [True, False], ids=["LMMS_EVAL_PLUGINS", "entry_point"])
def test_generate_until_through_the_harness_equals_movekd_generate(setup, plugins):
    root, export, docs = setup
    rows = _run_lmms(root, export, "movekd_test_gen", docs, plugins)
    model, tok = load_pretrained(export), AutoTokenizer.from_pretrained(export / "tokenizer")
    want = generate(model, tok, QUESTIONS, _images(docs), SPEC, "vicuna_v1", GenerationConfig(max_new_tokens=6))
    got = [r["filtered_resps"] for r in rows]
    assert [r["doc_id"] for r in rows] == list(range(len(docs)))
    assert got == want
    assert any(w for w in want), "the tiny model generated only empty answers: the comparison says nothing"


def test_loglikelihood_through_the_harness(setup):
    """Choices: the greedy answer and two others. The harness receives, per choice, lmms-eval's
    convention (mean NLL per token, is_greedy) from score_continuation and its accuracy is the
    argmin's; each choice's log-probability and greedy flag equal the same tokens fed one at a
    time through the KV cache."""
    root, export, docs = setup
    model, tok = load_pretrained(export), AutoTokenizer.from_pretrained(export / "tokenizer")
    images = _images(docs)
    cfg = GenerationConfig(max_new_tokens=4)
    greedy = generate(model, tok, QUESTIONS, images, SPEC, "vicuna_v1", cfg)
    mc = [dict(d, choices=[g, "zebra", "42"]) for d, g in zip(docs, greedy)]
    rows = _run_lmms(root, export, "movekd_test_mc", mc, plugins=True)
    for doc, row, image in zip(mc, rows, images):
        harness = row["filtered_resps"]
        mine = [score_continuation(model, tok, doc["question"], c, image, SPEC) for c in doc["choices"]]
        loss = [-m.logprob / m.num_tokens for m in mine]
        assert [float(h[0]) for h in harness] == pytest.approx(loss, rel=1e-5, abs=1e-5)
        assert [str(h[1]) for h in harness] == [str(m.is_greedy) for m in mine]  # the sample log holds str
        assert row["acc"] == float(int(np.argmin(loss)) == 0)  # doc_to_target 0: the greedy answer
    # independently: the same tokens teacher-forced one at a time through the LLM's KV cache
    for doc, image in zip(mc, images):
        for choice in doc["choices"]:
            score = score_continuation(model, tok, doc["question"], choice, image, SPEC)
            logp, greedy, n = _incremental(model, tok, doc["question"], choice, image)
            assert (score.num_tokens, score.is_greedy) == (n, greedy)
            assert score.logprob == pytest.approx(logp, abs=1e-4)


def _incremental(model, tok, question, answer, image):
    """(sum log p, all argmax, count) of the answer's tokens (and </s>), fed one at a time after the
    prompt through the LLM with its KV cache (the generation path), not one full forward."""
    from student.generate import _pixels, embed_prompts

    prompt = generation_prompt(question, "vicuna_v1", image is not None)
    full = f"{prompt} {answer}</s>"
    ids, labels = encode_prompt(full, [(len(prompt), len(full))], tok)
    first = next(i for i, lab in enumerate(labels) if lab >= 0)
    assert all(lab >= 0 for lab in labels[first:])
    llm = model.llava.llm
    embeds, _ = embed_prompts(model.llava, [ids[:first]], _pixels([image], SPEC, "cpu", torch.float32), [bool(image)])
    with torch.no_grad():
        out = llm(inputs_embeds=embeds, use_cache=True)
        logp, greedy, past = 0.0, True, out.past_key_values
        for t in ids[first:]:
            dist = torch.log_softmax(out.logits[0, -1].float(), -1)
            logp, greedy = logp + float(dist[t]), greedy and int(dist.argmax()) == t
            out = llm(input_ids=torch.tensor([[t]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
    return logp, greedy, len(ids) - first


def test_model_args_are_checked(setup, tmp_path):
    from jobs.lmms_plugin.models.movekd import MoveKD

    _, export, _ = setup
    with pytest.raises(ValueError, match=r"unknown model_args \['temprature'\]"):
        MoveKD(pretrained=str(export), temprature=0.5)
    with pytest.raises(ValueError, match="no such folder"):
        MoveKD(pretrained=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="dtype='fp8'"):
        MoveKD(pretrained=str(export), dtype="fp8")
    lm = MoveKD(pretrained=str(export), batch_size="3", device="cpu")
    assert (lm.batch_size, lm.template, lm.device.type) == (3, "vicuna_v1", "cpu")
