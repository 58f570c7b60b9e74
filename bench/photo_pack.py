"""A packed LLaVA-format dataset of real photo crops, shared by the extraction and loading benches.

Images: ``tests.helpers.datasets.photo_crops`` (distinct 288 px crops of scikit-image's astronaut,
coffee, chelsea and rocket photos), resized with bicubic to ``size`` x ``size`` and saved as JPEG
quality 90. The default 512 px (262K pixels) is close to a COCO image (640 x 480, 307K pixels), so
JPEG decode and resize cost what they cost on LLaVA's data; the crops' native 288 px would make
decode look cheaper than it is. Rows are stage-1 (``plain`` template) captions, packed with the
real packer (``pipeline.packing.pack_dataset``).
"""

from __future__ import annotations

import json
import os

from PIL import Image

from pipeline.packed_dataset import PackedDataset
from pipeline.packing import pack_dataset

CROP = 288  # the largest square crop every one of the four photos has room for (chelsea is 300 px tall)


def write_photo_rows(root: str, n: int, size: int) -> tuple[str, str]:
    """``n`` distinct photo crops at ``size`` px plus a caption row each; returns (json, image_root)."""
    from tests.helpers.datasets import photo_crops

    image_root = os.path.join(root, "images")
    os.makedirs(image_root, exist_ok=True)
    rows = []
    for i, crop in enumerate(photo_crops(n, size=CROP)):
        rel = f"{i:06d}.jpg"
        img = crop if size == CROP else crop.resize((size, size), Image.Resampling.BICUBIC)
        img.save(os.path.join(image_root, rel), quality=90)
        rows.append(
            {
                "id": f"r{i}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": "<image>\n"},
                    {"from": "gpt", "value": f"a photo, crop number {i}, of a scene with objects and a background"},
                ],
            }
        )
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return path, image_root


def pack_photos(root: str, n: int, size: int = 512, shard_size: int = 64) -> tuple[PackedDataset, str]:
    """Write and pack ``n`` photos under ``root``; returns the pack and the LLaVA JSON path."""
    data, image_root = write_photo_rows(root, n, size)
    out = os.path.join(root, "packed")
    pack_dataset([data], image_root, out, shard_size=shard_size, workers=2, progress=False)
    return PackedDataset(out), data
