"""The bundled sample: a tiny LLaVA-format dataset made of photos shipped in installed packages.

``build_sample(out_dir)`` writes ``images/`` plus two JSON files, a pretrain-style one (LCS-558K
paths, the ``plain`` template: ``<image>`` then a caption) and a finetune-style one (LLaVA-665K
paths, multi-turn conversations, rows sharing an image, one text-only row), and a tiny evaluation
set (``sample_eval.jsonl``, LLaVA's question format plus reference ``answers``). It also plants the
oddities real data has: one truncated JPEG, identical bytes under two paths, a PNG named ``.jpg``,
a CMYK JPEG and grayscale JPEG/PNG files.

Decisions:
- Photos come from scikit-image's ``skimage/data`` folder, scikit-learn's sample images and
  matplotlib's sample data, located by path (``importlib``) so that building the sample does not
  import scikit-learn (and scipy). No downloads.
- JPEG sources are copied byte for byte (real-world encoders); PNG sources are encoded once with
  fixed settings (quality 90), large ones shrunk with ``Image.reduce`` (integer, exact). For a
  given Pillow build the output is byte-identical on every run.
- The returned dict carries what packing must report, so tests and the demo check against it.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import io
import json
import os

from PIL import Image

PRETRAIN_JSON = "sample_pretrain.json"
FINETUNE_JSON = "sample_finetune.json"
EVAL_JSONL = "sample_eval.jsonl"  # LLaVA-format questions (+ "answers" to score against)

# relative path -> (package, file, how to write it, reduce factor)
IMAGES = {
    "00453/004539375.jpg": ("skimage", "astronaut.png", "jpeg", 1),
    "00453/004539376.jpg": ("skimage", "chelsea.png", "jpeg", 1),
    "00127/001271234.jpg": ("skimage", "coffee.png", "jpeg", 1),
    "00127/001275678.jpg": ("skimage", "rocket.jpg", "copy", 1),
    "00881/008810042.jpg": ("matplotlib", "grace_hopper.jpg", "copy", 1),
    "00881/008810043.jpg": ("sklearn", "china.jpg", "copy", 1),
    "00002/000021337.jpg": ("skimage", "hubble_deep_field.jpg", "jpeg", 2),
    "coco/train2017/000000000139.jpg": ("skimage", "motorcycle_left.png", "jpeg", 1),
    "vg/VG_100K/2316472.jpg": ("skimage", "motorcycle_left.png", "jpeg", 1),  # same bytes
    "coco/train2017/000000000285.jpg": ("sklearn", "flower.jpg", "copy", 1),
    "gqa/images/2354786.jpg": ("skimage", "motorcycle_right.png", "jpeg", 1),
    "gqa/images/2375429.jpg": ("skimage", "camera.png", "jpeg", 1),  # grayscale JPEG
    "ocr_vqa/images/0385504209.jpg": ("skimage", "page.png", "copy", 1),  # PNG named .jpg
    "coco/train2017/000000000632.jpg": ("skimage", "retina.jpg", "cmyk", 3),  # CMYK JPEG
    "textvqa/train_images/0a0bc91825468c45.jpg": ("skimage", "coins.png", "truncated", 1),
}

CAPTIONS = {
    "00453/004539375.jpg": "an astronaut in a white spacesuit holding a helmet in front of a flag",
    "00453/004539376.jpg": "a ginger tabby cat looking to the side",
    "00127/001271234.jpg": "a cup of coffee with latte art on a saucer on a wooden table",
    "00127/001275678.jpg": "a rocket standing on its launch pad under a blue sky",
    "00881/008810042.jpg": "portrait of a woman in a navy uniform with an american flag behind her",
    "00881/008810043.jpg": "a chinese pagoda among trees on a sunny day",
    "00002/000021337.jpg": "hundreds of distant galaxies against the black of deep space",
}


def _turns(*pairs: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]


FINETUNE_ROWS = [
    (
        "000000000139",
        "coco/train2017/000000000139.jpg",
        _turns(
            "<image>\nWhat vehicle is shown in the picture?",
            "A red sport motorcycle.",
            "Which way is it facing?",
            "It is facing left, shown from its side.",
        ),
    ),
    (
        "000000000139",
        "coco/train2017/000000000139.jpg",
        _turns("What color is the motorcycle?\n<image>", "It is mostly red with black parts."),
    ),
    (
        "VQA_000000000139",
        "coco/train2017/000000000139.jpg",
        _turns("<image>\nIs anyone riding the motorcycle?\nAnswer with a single word.", "No"),
    ),
    (
        "2316472",
        "vg/VG_100K/2316472.jpg",
        _turns("<image>\nProvide a one-sentence caption for the image.", "A parked red motorcycle seen from the side."),
    ),
    (
        "000000000285",
        "coco/train2017/000000000285.jpg",
        _turns(
            "<image>\nWhat is in the center of the flower?",
            "A yellow center surrounded by petals.",
            "Is the photo taken indoors?",
            "No, it looks like an outdoor close-up.",
        ),
    ),
    ("2354786", "gqa/images/2354786.jpg", _turns("<image>\nWhat is the vehicle in this image?", "A motorcycle.")),
    (
        "2354786_1",
        "gqa/images/2354786.jpg",
        _turns("<image>\nIs the motorcycle facing right?\nAnswer the question using a single word.", "Yes"),
    ),
    (
        "2375429",
        "gqa/images/2375429.jpg",
        _turns("<image>\nWhat is the man holding?", "He is operating a camera on a tripod."),
    ),
    (
        "0385504209",
        "ocr_vqa/images/0385504209.jpg",
        _turns("<image>\nIs this page printed or handwritten?", "It is a printed page of text."),
    ),
    (
        "000000000632",
        "coco/train2017/000000000632.jpg",
        _turns(
            "<image>\nWhat kind of photograph is this?", "A medical photograph of the retina at the back of an eye."
        ),
    ),
    (
        "0a0bc91825468c45",
        "textvqa/train_images/0a0bc91825468c45.jpg",
        _turns("<image>\nHow many coins are there?", "There are twenty-four coins."),
    ),
    (
        "i6IyJda_0",
        None,
        _turns(
            "Write a haiku about distillation.",
            "Many teachers speak;\none small student listens close,\nkeeping what they see.",
        ),
    ),
]


def _source(package: str, filename: str) -> str:
    if package == "skimage":
        return str(importlib.resources.files("skimage.data") / filename)
    if package == "sklearn":  # by path: importing sklearn.datasets pulls in scipy
        spec = importlib.util.find_spec("sklearn")
        return os.path.join(spec.submodule_search_locations[0], "datasets", "images", filename)
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data(filename, asfileobj=False))


def _encode(src: str, how: str, factor: int) -> bytes:
    with open(src, "rb") as f:
        raw = f.read()
    if how == "copy":
        return raw
    with Image.open(io.BytesIO(raw)) as im:
        im = im.reduce(factor) if factor > 1 else im.copy()
    if how == "cmyk":
        im = im.convert("CMYK")
    elif im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2] if how == "truncated" else data


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _pretrain_rows() -> list[dict]:
    return [
        {"id": os.path.splitext(os.path.basename(p))[0], "image": p, "conversations": _turns("<image>", caption)}
        for p, caption in CAPTIONS.items()
    ]


def _finetune_rows() -> list[dict]:
    rows = []
    for rid, path, conv in FINETUNE_ROWS:
        row: dict = {"id": rid}
        if path is not None:
            row["image"] = path
        row["conversations"] = conv
        rows.append(row)
    return rows


# A tiny evaluation set in LLaVA's question format: (question_id, image or None, text, category,
# reference answers). The answers are what the photos show; a random tiny model scores ~0.
EVAL_QUESTIONS = (
    (0, "00453/004539376.jpg", "What animal is in the picture?", "object", ["cat", "tabby cat", "kitten"]),
    (1, "00127/001271234.jpg", "What drink is in the cup?", "object", ["coffee", "latte", "cappuccino"]),
    (2, "00127/001275678.jpg", "What is standing on the launch pad?", "object", ["rocket", "space shuttle"]),
    (3, "coco/train2017/000000000139.jpg", "What vehicle is this?", "object", ["motorcycle", "motorbike"]),
    (4, "gqa/images/2375429.jpg", "Is this photo in color?", "yes/no", ["no"]),
    (5, "00881/008810043.jpg", "Is it a sunny day?", "yes/no", ["yes"]),
    (6, "00453/004539375.jpg", "What is the person wearing?", "object", ["spacesuit", "space suit"]),
    (7, "coco/train2017/000000000285.jpg", "What is in the picture?", "object", ["flower", "flowers"]),
    (8, None, "How many legs does a dog have?", "text-only", ["4", "four"]),
)


def _eval_lines() -> list[str]:
    lines = []
    for qid, image, text, category, answers in EVAL_QUESTIONS:
        rec = {"question_id": qid, "text": text, "category": category, "answers": answers}
        if image is not None:
            rec["image"] = image
        lines.append(json.dumps(rec))
    return lines


def build_sample(out_dir: str) -> dict:
    """Write the sample under ``out_dir``; return paths and what packing it must report."""
    image_root = os.path.join(out_dir, "images")
    for rel, (package, filename, how, factor) in IMAGES.items():
        _write(os.path.join(image_root, rel), _encode(_source(package, filename), how, factor))
    jsons = []
    for name, rows in ((PRETRAIN_JSON, _pretrain_rows()), (FINETUNE_JSON, _finetune_rows())):
        jsons.append(os.path.join(out_dir, name))
        _write(jsons[-1], (json.dumps(rows, indent=2) + "\n").encode())
    eval_path = os.path.join(out_dir, EVAL_JSONL)
    _write(eval_path, ("\n".join(_eval_lines()) + "\n").encode())
    return {
        "root": out_dir,
        "image_root": image_root,
        "json": jsons,
        "eval": eval_path,
        "expected": {
            "rows": len(CAPTIONS) + len(FINETUNE_ROWS),
            "rows_text_only": 1,
            "unique_paths": len(IMAGES),
            "unique_images": len(IMAGES) - 2,  # minus the duplicate and the broken file
            "unreadable": ["textvqa/train_images/0a0bc91825468c45.jpg"],
            "duplicate_content": ["vg/VG_100K/2316472.jpg"],
            "format_mismatch": ["ocr_vqa/images/0385504209.jpg"],
            "color_mode": [
                "coco/train2017/000000000632.jpg",
                "gqa/images/2375429.jpg",
                "ocr_vqa/images/0385504209.jpg",
            ],
        },
    }
