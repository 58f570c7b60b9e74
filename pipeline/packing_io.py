"""The writing half of packing: shard tars (atomic, resumable), lookup tables, report, index.

Decisions (the layout itself is documented in ``packed_dataset``):
- Tars are written with ``tarfile`` in WebDataset's layout, members of one sample sorted by
  extension like ``webdataset.TarWriter``, with fixed mtime/owner/mode so identical input gives
  identical bytes (resume can then compare a rewritten shard with the recorded sha256).
- ``_progress.json`` is the completed list: one record per finished shard (content digest, tar
  sha256 and size), rewritten atomically after every shard. A tar without a matching record,
  a ``*.tar.tmp`` leftover or a tar whose size/sha256 changed is rewritten.
- Every file is written to a temp name, fsynced and renamed; ``index.json`` goes last.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from tqdm import tqdm

from pipeline.llava_data import resolve_inside
from pipeline.packed_dataset import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    KEY_HEX,
    REPORT_NAME,
    SKIPPED,
    TEXT_ONLY,
    file_sha256,
    shard_name,
)

PROGRESS_NAME = "_progress.json"
TMP_SUFFIX = ".tmp"
TABLES = {
    "keys": "keys.npy",
    "exts": "exts.npy",
    "paths": "paths.npy",
    "path_image": "path_image.npy",
    "images": "images.jsonl",
}


def atomic_write(path: str, data: bytes) -> None:
    tmp = path + TMP_SUFFIX
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: object) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# -- shards ------------------------------------------------------------------------------------
def _shard_digest(shard: list) -> str:
    return hashlib.sha256(json.dumps([(im.ext, im.meta()) for im in shard], sort_keys=True).encode()).hexdigest()


def _read_verified(image_root: str, im) -> bytes:
    real = resolve_inside(image_root, im.paths[0])
    with open(real, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != im.sha256:
        raise ValueError(
            f"{im.paths[0]} changed after it was checked (sha256 differs); "
            "rerun `movekd pack`: finished shards are kept"
        )
    return data


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    info.uname = info.gname = "bigdata"  # what webdataset.TarWriter records
    tar.addfile(info, io.BytesIO(payload))


def _write_tar(out_dir: str, i: int, shard: list, image_root: str, digest: str) -> dict:
    path = os.path.join(out_dir, shard_name(i))
    tmp = path + TMP_SUFFIX
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for im in shard:
                meta = json.dumps(im.meta(), sort_keys=True).encode()
                data = _read_verified(image_root, im)
                for ext, payload in sorted([(im.ext, data), ("json", meta)]):
                    _add_member(tar, f"{im.key}.{ext}", payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"digest": digest, "sha256": file_sha256(path), "size": os.path.getsize(path), "num_images": len(shard)}


def _intact(out_dir: str, i: int, rec: dict | None, digest: str) -> bool:
    path = os.path.join(out_dir, shard_name(i))
    if not rec or rec.get("digest") != digest or not os.path.isfile(path):
        return False
    return os.path.getsize(path) == rec.get("size") and file_sha256(path) == rec.get("sha256")


def _load_progress(out_dir: str) -> dict:
    try:
        with open(os.path.join(out_dir, PROGRESS_NAME), encoding="utf-8") as f:
            data = json.load(f)
        return dict(data["shards"]) if data.get("version") == FORMAT_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _clean(out_dir: str, num_shards: int, done: dict) -> None:
    """Delete temp leftovers and shards beyond the plan (from an earlier, larger input)."""
    for tmp in glob.glob(os.path.join(out_dir, "*" + TMP_SUFFIX)):
        os.remove(tmp)
    planned = {shard_name(i) for i in range(num_shards)}
    for path in glob.glob(os.path.join(out_dir, "shard-*.tar")):
        name = os.path.basename(path)
        if name not in planned:
            os.remove(path)
            done.pop(name, None)


def write_shards(
    images: list, image_root: str, out_dir: str, shard_size: int, workers: int, progress: bool
) -> tuple[list[int], list[int], list[dict]]:
    """Write every shard that is not already complete; return (written, reused, records)."""
    shards = [images[i : i + shard_size] for i in range(0, len(images), shard_size)]
    digests = [_shard_digest(s) for s in shards]
    done = _load_progress(out_dir)
    _clean(out_dir, len(shards), done)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        ok = list(pool.map(lambda i: _intact(out_dir, i, done.get(shard_name(i)), digests[i]), range(len(shards))))
        reused = [i for i in range(len(shards)) if ok[i]]
        todo = [i for i in range(len(shards)) if not ok[i]]
        for i in todo:
            done.pop(shard_name(i), None)
        bar = tqdm(total=len(shards), initial=len(reused), desc="write shards", unit="shard", disable=not progress)
        futures = {pool.submit(_write_tar, out_dir, i, shards[i], image_root, digests[i]): i for i in todo}
        try:
            for fut in as_completed(futures):
                done[shard_name(futures[fut])] = fut.result()
                atomic_write_json(os.path.join(out_dir, PROGRESS_NAME), {"version": FORMAT_VERSION, "shards": done})
                bar.update()
        except BaseException:
            for fut in futures:
                fut.cancel()  # finished shards are recorded; the rest are redone on rerun
            raise
        finally:
            bar.close()
    records = [dict(done[shard_name(i)], name=shard_name(i)) for i in range(len(shards))]
    return todo, reused, records


# -- tables, report, index ------------------------------------------------------------------------
def _bytes_array(items: list[bytes]) -> np.ndarray:
    return np.array(items, dtype=f"S{max((len(b) for b in items), default=1) or 1}")


def _row_array(f, ordinal: dict[str, int], path_key: dict[str, str]) -> np.ndarray:
    out = np.full(f.n_rows, TEXT_ONLY, dtype=np.int32)
    for i, p in enumerate(f.images):
        if p is not None and p in path_key:
            out[i] = ordinal[path_key[p]]
        elif p is not None or i in f.rejected:
            out[i] = SKIPPED
    return out


def write_tables(result, files: list, images: list, path_key: dict[str, str], shard_records: list[dict]) -> dict:
    """Write the lookup tables; return the index document (written last by ``commit``)."""
    out = result.out_dir
    ordinal = {im.key: n for n, im in enumerate(images)}
    paths = sorted(path_key)
    tables = {
        "keys": np.array([im.key.encode() for im in images], dtype=f"S{KEY_HEX}"),
        "exts": _bytes_array([im.ext.encode() for im in images]),
        "paths": _bytes_array([p.encode() for p in paths]),
        "path_image": np.array([ordinal[path_key[p]] for p in paths], dtype=np.int32),
    }
    for name, arr in tables.items():
        atomic_write(os.path.join(out, TABLES[name]), _npy_bytes(arr))
    lines = [
        json.dumps({**im.meta(), "ext": im.ext, "shard": n // result.shard_size}, sort_keys=True)
        for n, im in enumerate(images)
    ]
    atomic_write(os.path.join(out, TABLES["images"]), "".join(x + "\n" for x in lines).encode())
    file_docs = []
    for j, f in enumerate(files):
        rows = _row_array(f, ordinal, path_key)
        atomic_write(os.path.join(out, f"rows-{j}.npy"), _npy_bytes(rows))
        file_docs.append(
            {
                "name": f.name,
                "path": f.path,
                "sha256": f.sha256,
                "rows": f"rows-{j}.npy",
                "n_rows": f.n_rows,
                "text_only": int((rows == TEXT_ONLY).sum()),
                "skipped": int((rows == SKIPPED).sum()),
            }
        )
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": result.name,
        "image_root": result.image_root,
        "fingerprint": result.fingerprint,
        "shard_size": result.shard_size,
        "num_shards": result.num_shards,
        "num_images": result.num_images,
        "key_hex": KEY_HEX,
        "max_pixels": result.max_pixels,
        "shards": shard_records,
        "files": file_docs,
        "tables": TABLES,
        "counts": result.counts,
    }


def write_report(out_dir: str, counts: dict, problems: list) -> None:
    """``{"counts": {...}, "problems": {category: [entry, ...]}}``, one entry per line.

    Laid out by hand: ``json.dumps(indent=...)`` falls back to the pure-Python encoder, which
    takes tens of seconds on a 665K-row report; one compact entry per line stays greppable.
    """
    by_cat: dict[str, list[str]] = {}
    for p in problems:
        by_cat.setdefault(p.category, []).append(json.dumps(p.to_dict(), sort_keys=True))
    cats = [f"  {json.dumps(cat)}: [\n   " + ",\n   ".join(by_cat[cat]) + "\n  ]" for cat in sorted(by_cat)]
    text = f'{{\n "counts": {json.dumps(counts, sort_keys=True)},\n "problems": {{\n' + ",\n".join(cats) + "\n }\n}\n"
    atomic_write(os.path.join(out_dir, REPORT_NAME), text.encode())


def uncommit(out_dir: str) -> None:
    """Remove ``index.json``: from here until ``commit`` the directory is not a finished pack."""
    if os.path.exists(os.path.join(out_dir, INDEX_NAME)):
        os.remove(os.path.join(out_dir, INDEX_NAME))


def commit(out_dir: str, index: dict) -> None:
    atomic_write_json(os.path.join(out_dir, INDEX_NAME), index)
