"""Disk budget of the MoVE-KD caches: bytes per image and TB for LCS-558K and LLaVA-665K, per preset.

Decisions and assumptions (each printed with the tables):

- Teacher shapes (docs/method.md §2): clip 576 x 1024, eva 4096 x 1024, convnext 1024 x 3072,
  sam 4096 x 256; v1.0 = clip, eva, convnext; v1.1 adds sam. ``resample`` mode resizes every
  teacher's grid to 24 x 24 = 576 tokens (clip already is).
- Compressed sizes are not extrapolated from a single ratio: ``bench_codecs.py`` measured, per
  preset and per stored component, the bytes on disk per element on real DINOv2 ViT-S/14
  penultimate features (448 px by default); a teacher's size is each component's element count
  for that teacher's shape times that measured bytes/element. The assumption is that the teachers'
  features compress like DINOv2's (same bytes per value, per level histogram); the scale
  components then cost what their shapes say (e.g. ``int8``'s per-token scale is 32/C bits).
- Per image the cache also stores the CLIP [CLS] state (1024 float32) and its attention row
  (576 float32): 6,400 bytes, counted uncompressed (zstd saves little on float32).
- Images: stage 1 (``square``) caches LCS-558K = 558,128 images. Stage 2 (``pad``) caches the
  unique images of llava_v1_5_mix665k.json. Its 665,298 rows reference, by source (LLaVA issue
  #657): coco 364,100, gqa 72,140, ocr_vqa 80,000, textvqa 21,953, vg 86,417 rows (+ 40,688
  text-only rows, which all share the one no-image row). Assumed: one row per image for gqa,
  ocr_vqa, textvqa and vg (TextCaps' 21,953 rows = the TextVQA train images), and at most all of
  COCO train2017 (118,287) for the coco rows: 378,797 unique images. The upper bound if every
  image of the downloaded folders were extracted (LLaVA issue #702: coco 118,287, gqa 148,854,
  textvqa 25,119, vg 108,249; ocr_vqa the 80,000 referenced) is 480,509: printed as a column.
- TB = 1e12 bytes.

Run: ``.venv/bin/python bench/bench_disk_budget.py [--codec-json results.json] [--px 448]``
(without ``--codec-json`` it measures the sizes itself: loads the model, about a minute).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import get_codec, list_codecs  # noqa: E402

TEACHERS = {"clip": (576, 1024), "eva": (4096, 1024), "convnext": (1024, 3072), "sam": (4096, 256)}
SETS = {"v1.0": ("clip", "eva", "convnext"), "v1.1": ("clip", "sam", "eva", "convnext")}
RESAMPLED_TOKENS = 24 * 24
AUX_BYTES = 1024 * 4 + 576 * 4  # [CLS] state + [CLS] attention row, float32
LCS_558K = 558_128
LLAVA_665K_UNIQUE = 118_287 + 72_140 + 80_000 + 21_953 + 86_417  # 378,797 (see the docstring)
LLAVA_665K_FOLDERS = 118_287 + 148_854 + 80_000 + 25_119 + 108_249  # 480,509
MEASURED_CHANNELS = 384  # DINOv2 ViT-S


def bytes_per_element(row: dict, px: int) -> dict[str, float]:
    """Measured on-disk bytes per stored element of each component of ``row``'s preset."""
    tokens = (px // 14) ** 2
    comps = get_codec(row["codec"]).components(tokens, MEASURED_CHANNELS)
    return {c.name: row["components"][c.name] / int(np.prod(c.shape)) for c in comps}


def teacher_bytes(codec: str, per_element: dict[str, float], tokens: int, channels: int) -> float:
    return sum(per_element[c.name] * int(np.prod(c.shape)) for c in get_codec(codec).components(tokens, channels))


def image_bytes(
    codec: str | None, per_element: dict[str, float] | None, teachers: tuple[str, ...], resample: bool
) -> float:
    """Bytes per image for a teacher set; ``codec=None`` is raw bf16 (2 bytes/value, no compression)."""
    total = float(AUX_BYTES)
    for name in teachers:
        tokens, channels = TEACHERS[name]
        tokens = RESAMPLED_TOKENS if resample else tokens
        total += 2.0 * tokens * channels if codec is None else teacher_bytes(codec, per_element, tokens, channels)
    return total


COMBOS = [(set_name, resample) for set_name in SETS for resample in (False, True)]


def _combo_name(set_name: str, resample: bool) -> str:
    return f"{set_name} {'resample 24x24' if resample else 'native'}"


def budget(results: list[dict], px: int) -> list[tuple[str, list[float]]]:
    """``(preset, [bytes per image for each of COMBOS])``, raw bf16 first."""
    presets = [(None, None)] + [(r["codec"], bytes_per_element(r, px)) for r in results]
    return [
        (codec or "raw bf16", [image_bytes(codec, per_el, SETS[s], rs) for s, rs in COMBOS])
        for codec, per_el in presets
    ]


def budget_tables(rows: list[tuple[str, list[float]]]) -> str:
    head = "| preset | " + " | ".join(_combo_name(*c) for c in COMBOS) + " |"
    rule = "|---|" + "---|" * len(COMBOS)
    per_image = [head, rule] + [f"| `{n}` | " + " | ".join(f"{b / 1e6:.2f}" for b in bs) + " |" for n, bs in rows]
    tb = [head, rule]
    for n, bs in rows:
        cells = [
            f"{b * LCS_558K / 1e12:.2f} + {b * LLAVA_665K_UNIQUE / 1e12:.2f} = "
            f"**{b * (LCS_558K + LLAVA_665K_UNIQUE) / 1e12:.2f}**"
            for b in bs
        ]
        tb.append(f"| `{n}` | " + " | ".join(cells) + " |")
    upper = (LCS_558K + LLAVA_665K_FOLDERS) / (LCS_558K + LLAVA_665K_UNIQUE)
    return (
        "MB per image (1 MB = 1e6 B; teacher features + 6,400 B aux):\n\n"
        + "\n".join(per_image)
        + f"\n\nTB: stage-1 `square` cache (LCS-558K, {LCS_558K:,} images) + stage-2 `pad` cache "
        f"(665K unique images, {LLAVA_665K_UNIQUE:,}) = total:\n\n"
        + "\n".join(tb)
        + f"\n\nIf the pad cache held every downloaded image ({LLAVA_665K_FOLDERS:,}), "
        f"multiply the pad column by {LLAVA_665K_FOLDERS / LLAVA_665K_UNIQUE:.3f} (the totals by {upper:.3f})."
    )


def per_element_table(results: list[dict], px: int) -> str:
    lines = ["| preset | measured bytes/element per component | size vs fp16 (DINOv2, C=384) |", "|---|---|---|"]
    for r in results:
        per_el = bytes_per_element(r, px)
        comps = ", ".join(f"{k} {v:.4f}" for k, v in per_el.items())
        lines.append(f"| `{r['codec']}` | {comps} | {r['ratio']:.4f} |")
    return "\n".join(lines)


def load_results(path: Path | None, px: int) -> list[dict]:
    if path is not None:
        data = json.loads(path.read_text())["results"]
        if str(px) not in data:
            raise SystemExit(f"{path} has no {px} px results (has {sorted(data)}); rerun bench_codecs.py --sizes {px}")
        return data[str(px)]
    from bench.bench_codecs import run

    return run([px], reps=0, check_port=False)[0][px]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codec-json", type=Path, help="results of bench_codecs.py --json (default: measure now)")
    p.add_argument("--px", type=int, default=448, help="which measured input size to take the sizes from")
    args = p.parse_args(argv)
    results = [r for r in load_results(args.codec_json, args.px) if r["codec"] in list_codecs()]
    print(
        f"Sizes per element measured by bench_codecs.py on DINOv2 ViT-S/14 features at {args.px} px "
        f"(assumed to hold for every teacher); + {AUX_BYTES:,} B/image of [CLS] state and attention row; "
        f"TB = 1e12 B.\n\n{per_element_table(results, args.px)}\n"
    )
    print(budget_tables(budget(results, args.px)))


if __name__ == "__main__":
    main()
