"""The ``movekd`` model for lmms-eval: a student export answering the harness's requests.

Each request is answered exactly as ``movekd generate`` / ``movekd answer`` answer it
(``student.generate``: LLaVA's evaluation prompt with the export's template, the export's
preprocessing, the LLM's ``generate`` with KV cache, greedy unless the task asks otherwise), so a
score from the harness and one from ``movekd answer`` + LLaVA's scripts come from the same answers.

- ``generate_until``: requests are grouped by their generation kwargs and batched
  (``batch_size``); ``max_new_tokens``, ``temperature``, ``top_p``, ``num_beams`` are honoured
  (default: ``max_new_tokens`` of the model args, greedy); the answer is cut at the first ``until``
  string, as the harness's own models do.
- ``loglikelihood``: ``student.generate.score_continuation`` (the continuation fills the assistant
  turn, closed by the template's ``sep2``), returned as lmms-eval's own ``llava`` model returns it:
  ``(mean negative log-likelihood per continuation token, is_greedy)``; the harness's
  ``multiple_choice`` scoring takes the argmin (lmms-eval issue #370). lmms-eval 0.7.3's evaluator
  turns any response that is not a string or ``GenerationResult`` into ``str(response)``, which
  breaks every ``multiple_choice`` task; the pairs are therefore handed over inside a
  ``GenerationResult`` (whose ``text`` the evaluator passes through unchanged).
- At most one image per request (the student splices one image); text-only requests work.
- Multi-process: run under ``accelerate launch`` or ``torchrun``; the harness shards the requests
  and sets this model's rank; each process uses ``cuda:LOCAL_RANK`` when CUDA is present.
"""

from __future__ import annotations

import json
import os

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from jobs.inference import load_for_inference
from student.generate import GenerationConfig, generate, score_continuation

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MoveKD(lmms):
    """A movekd student export as an lmms-eval model.

    Args (``--model_args key=value,...``):
        pretrained: the export folder (``movekd train``'s ``RUN/export``).
        template: conversation template (default: the one the export was trained with).
        batch_size: requests per ``generate`` call (default 1).
        device: ``cpu``, ``cuda``, ``cuda:N`` (default: ``cuda:LOCAL_RANK`` when CUDA is present, else cpu).
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        max_new_tokens: default answer length when a task does not set one (default 128).
    """

    def __init__(
        self,
        pretrained: str,
        template: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int | str = 128,
        max_batch_size: int | None = None,  # passed by the harness; batches are fixed-size here
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"movekd: unknown model_args {sorted(unknown)} (known: {_KNOWN})")
        if str(batch_size).startswith("auto"):
            raise ValueError("movekd: batch_size=auto is not supported; pass a number")
        if dtype not in DTYPES:
            raise ValueError(f"movekd: dtype={dtype!r}; choose one of {sorted(DTYPES)}")
        if device is None or device == "cuda":
            cuda = torch.cuda.is_available()
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"
        self._device = torch.device(device)
        torch_dtype = DTYPES[dtype] or (torch.bfloat16 if self._device.type == "cuda" else None)
        model, self.tokenizer, self.preprocess, self.template = load_for_inference(pretrained, template, torch_dtype)
        self.model = model.to(self._device).eval()
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"movekd: batch_size and max_new_tokens must be >= 1 ({batch_size}, {max_new_tokens})")

    @property
    def device(self) -> torch.device:
        return self._device

    def _visual(self, doc_to_visual, task: str, split: str, doc_id):
        """The request's one image (or None); more than one is an error naming the task and doc."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"movekd: task {task} doc {doc_id} has {len(visuals)} images; a student takes one")
        if visuals and not hasattr(visuals[0], "convert"):
            raise ValueError(f"movekd: task {task} doc {doc_id}: visual is {type(visuals[0]).__name__}, not an image")
        return visuals[0] if visuals else None

    def _gen_config(self, kwargs: dict) -> tuple[GenerationConfig, list[str]]:
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        cfg = GenerationConfig(
            max_new_tokens=int(kwargs.get("max_new_tokens") or self.max_new_tokens),
            temperature=float(kwargs.get("temperature") or 0.0),
            num_beams=int(kwargs.get("num_beams") or 1),
            top_p=kwargs.get("top_p") if float(kwargs.get("temperature") or 0.0) > 0 else None,
        )
        return cfg, [u for u in until if u]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [r.args for r in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs, *_rest) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(args)
        with tqdm(total=len(args), desc="movekd generate_until", disable=self.rank != 0) as bar:
            for idxs in groups.values():
                cfg, until = self._gen_config(args[idxs[0]][1])
                for start in range(0, len(idxs), self.batch_size):
                    batch = idxs[start : start + self.batch_size]
                    contexts = [args[i][0] for i in batch]
                    images = [self._visual(args[i][2], args[i][4], args[i][5], args[i][3]) for i in batch]
                    texts = generate(self.model, self.tokenizer, contexts, images, self.preprocess, self.template, cfg)
                    for i, text in zip(batch, texts):
                        for stop in until:
                            text = text.split(stop)[0]
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), text)
                    bar.update(len(batch))
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        res = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm(
            [r.args for r in requests], desc="movekd loglikelihood", disable=self.rank != 0
        ):
            doc = self.task_dict[task][split][doc_id]
            # the harness prefixes choices with its completion-style target_delimiter (" "); the chat
            # template already separates "ASSISTANT:" from the answer, so the answer starts at its text
            continuation = (target if isinstance(target, str) else target(doc)).lstrip()
            image = self._visual(doc_to_visual, task, split, doc_id)
            score = score_continuation(
                self.model, self.tokenizer, context, continuation, image, self.preprocess, self.template
            )
            res.append(GenerationResult(text=(-score.logprob / score.num_tokens, score.is_greedy)))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("movekd: multi-round generation is not supported; use single-round tasks")


_KNOWN = ["pretrained", "template", "batch_size", "device", "dtype", "max_new_tokens"]
