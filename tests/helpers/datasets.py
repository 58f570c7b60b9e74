"""Small real-photo datasets in LLaVA format for pipeline and end-to-end tests."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from pipeline.packed_dataset import PackedDataset
from pipeline.packing import pack_dataset


def photo_crops(n: int, size: int = 96) -> list[Image.Image]:
    """``n`` distinct real-photo crops (scikit-image's astronaut, coffee, chelsea, rocket)."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        step = i // len(photos)
        y, x = (7 * step) % (img.shape[0] - size), (11 * step) % (img.shape[1] - size)
        out.append(Image.fromarray(np.ascontiguousarray(img[y : y + size, x : x + size])))
    return out


def write_llava(root: str, n: int, text_only: int = 1) -> tuple[str, str]:
    """A LLaVA JSON with ``n`` image rows (distinct crops) and ``text_only`` rows; (json, image_root)."""
    image_root = os.path.join(root, "images")
    os.makedirs(os.path.join(image_root, "coco"), exist_ok=True)
    rows = []
    for i, img in enumerate(photo_crops(n)):
        rel = f"coco/{i:06d}.jpg"
        img.save(os.path.join(image_root, rel), quality=90)
        rows.append(
            {
                "id": f"r{i}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is shown?"},
                    {"from": "gpt", "value": f"Photo {i}."},
                ],
            }
        )
    for j in range(text_only):
        rows.append(
            {"id": f"t{j}", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}
        )
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return path, image_root


def pack_crops(root: str, n: int, shard_size: int) -> PackedDataset:
    data, image_root = write_llava(root, n)
    out = os.path.join(root, "packed")
    pack_dataset([data], image_root, out, shard_size=shard_size, workers=2, progress=False)
    return PackedDataset(out)


def corrupt_member(packed: PackedDataset, shard: int) -> str:
    """Truncate the first image of ``shard`` inside its tar (as a bad disk would); returns its key."""
    path = packed.shard_path(shard)
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if not m.name.endswith(".json"))
    with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == victim:
                data = data[: len(data) // 3]
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    os.replace(path + ".tmp", path)
    return victim.rsplit(".", 1)[0]
