"""DistillDataset: items equal what the cache holds, what HF's CLIP processor gives and the
vicuna_v1 prompt written out in the test; text-only rows use the reserved row, bad rows are
skipped and counted, bad caches fail clearly, and DataLoader workers change nothing."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from cache import NULL_KEY, PreprocessSpec, get_codec, open_cache
from student.conversation import IGNORE_INDEX, render, tokenize_conversation
from student.data import ConversationRecord, DistillDataset, collate_distill
from student.llava import collate
from student.sampler import DistributedLengthGroupedSampler
from student.tiny import make_tiny_tokenizer
from tests.cache import synth

SPEC = PreprocessSpec(resolution=56)  # the synthetic clip teacher's spec (4x4 grid of 14 px)
FAILED_KEY = "img-001-01"  # synth.default_failed
IMAGE_TOKEN = -200  # LLaVA's IMAGE_TOKEN_INDEX, spliced into the LLM's embeddings later
SYSTEM = (  # LLaVA's conv_vicuna_v1 system prompt, written out here
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class DictLoader:
    """A picklable key -> PIL image loader (images as arrays, rebuilt on each call)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __call__(self, key: str) -> Image.Image:
        return Image.fromarray(self.arrays[key])


def chat(question: str, answer: str, image: bool = True) -> list[dict]:
    q = ("<image>\n" if image else "") + question
    return [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("distill") / "cache")
    return path, synth.build_cache(path)


@pytest.fixture(scope="module")
def images(built):
    rng = np.random.default_rng(0)
    keys = [k for s in range(built[1].num_shards) for k in synth.shard_keys(built[1], s)]
    sizes = [(60, 80), (90, 56), (57, 57), (120, 64)]
    return {k: rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8) for i, k in enumerate(keys)}


def make_records(manifest) -> list[ConversationRecord]:
    keys = [k for s in range(manifest.num_shards) for k in synth.shard_keys(manifest, s)]
    recs = [
        ConversationRecord(f"r{i}", "toy.json", i, chat("What is in the image?", f"A cat number {i}."), k)
        for i, k in enumerate(keys)
    ]
    n = len(recs)
    recs += [
        ConversationRecord("t0", "toy.json", n, chat("Tell me a joke.", "No.", image=False)),
        ConversationRecord("t1", "toy.json", n + 1, chat("How many dogs are there?", "Two dogs.", image=False)),
        ConversationRecord("bad", "toy.json", n + 2, [{"from": "human", "value": "<image>\nhi"}], keys[0]),
        ConversationRecord("long", "toy.json", n + 3, chat("word " * 300, "ok", image=False)),
        ConversationRecord("dup", "toy.json", n + 4, chat("Describe it.", "A red sofa."), keys[0]),
    ]
    return recs


def build(built, images, tok, records=None, **kw):
    path, manifest = built
    kw.setdefault("preprocess", SPEC)
    kw.setdefault("max_length", 128)
    return DistillDataset(
        records if records is not None else make_records(manifest), DictLoader(images), open_cache(path), tok, **kw
    )


@pytest.fixture(scope="module")
def ds(built, images, tok):
    return build(built, images, tok)


def expected_aux(manifest) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for shard in range(manifest.num_shards + 1):
        d = synth.shard_data(manifest, shard)
        for j, key in enumerate(d["keys"]):
            out[key] = (d["cls_state"][j], d["cls_attn"][j])
    return out


def hf_pixels(image: np.ndarray) -> np.ndarray:
    proc = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return proc(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0]


def test_items_equal_cache_hf_processor_and_prompt(ds, built, images, tok):
    manifest = built[1]
    feats, aux = synth.expected_decoded(manifest), expected_aux(manifest)
    assert len(ds) == 11 - 1 + 2 + 1  # 11 images minus the failed one, 2 text-only, the duplicate
    for i in range(len(ds)):
        s, rec = ds[i], ds.record(i)
        key = rec.image_key or NULL_KEY
        assert s["key"] == key and s["has_image"] == (rec.image_key is not None)
        for t in manifest.teachers:
            assert s["targets"][t.name].dtype == torch.float32
            assert s["targets"][t.name].shape == (t.tokens, t.channels)
            np.testing.assert_array_equal(s["targets"][t.name].numpy(), feats[key][t.name])
        np.testing.assert_array_equal(s["cls_state"].numpy(), aux[key][0])
        np.testing.assert_array_equal(s["cls_attn"].numpy(), aux[key][1])

        # the vicuna_v1 prompt: one image placeholder right after "USER: ", "</s>" after the answer
        ids, labels = s["input_ids"].tolist(), s["labels"].tolist()
        question, answer = (turn["value"].replace("<image>\n", "") for turn in rec.conversations)
        image = rec.image_key is not None
        assert ids.count(IMAGE_TOKEN) == int(image)
        text = f"<s>{SYSTEM} USER: {chr(10) if image else ''}{question} ASSISTANT: {answer}</s>"
        assert tok.decode([t for t in ids if t != IMAGE_TOKEN]) == text
        if image:
            assert tok.decode(ids[: ids.index(IMAGE_TOKEN)]) == f"<s>{SYSTEM} USER: "
        # only the answer is supervised: one run of tokens at the end, equal to the input there
        sup = [j for j, v in enumerate(labels) if v != IGNORE_INDEX]
        assert sup == list(range(sup[0], len(ids))) and [ids[j] for j in sup] == [labels[j] for j in sup]
        assert tok.decode([ids[j] for j in sup]).lstrip() == f"{answer}</s>"

        assert s["pixel_values"].shape == (3, 56, 56) and s["pixel_values"].dtype == torch.float32
        if image:
            assert np.abs(s["pixel_values"].numpy() - hf_pixels(images[rec.image_key])).max() <= 1e-6


def test_text_only_rows_use_the_null_row_and_black_pixels(ds, built):
    null = synth.expected_decoded(built[1])[NULL_KEY]
    text_only = [i for i, m in enumerate(ds.modalities()) if not m]
    assert [ds.record(i).row_id for i in text_only] == ["t0", "t1"]
    for i in text_only:
        s = ds[i]
        assert s["key"] == NULL_KEY and s["has_image"] is False
        # the released input: a black image through the student's CLIP processor, -mean/std
        black = hf_pixels(np.zeros((336, 336, 3), np.uint8))
        assert np.abs(s["pixel_values"].numpy() - black).max() <= 1e-6 and s["pixel_values"].max() < -1.4
        for name, want in null.items():
            np.testing.assert_array_equal(s["targets"][name].numpy(), want)


def test_image_rows_without_placeholder_are_kept_and_counted(built, images, tok):
    """As LLaVA: the row keeps its image (student pixels and cached targets of that image, so KD
    and the balance loss apply) but has no sentinel and ``has_image`` (splice) False."""
    manifest = built[1]
    key = synth.shard_keys(manifest, 0)[0]
    recs = make_records(manifest) + [
        ConversationRecord("np", "toy.json", 99, chat("What is it?", "A cat.", False), key)
    ]
    ds = build(built, images, tok, recs)
    assert ds.counts["image_without_placeholder"]["count"] == 1
    assert "id np" in ds.counts["image_without_placeholder"]["examples"][0]
    assert ds.counts["rows"] == len(ds) and ds.counts["rows_text_only"] == 2
    i = next(i for i in range(len(ds)) if ds.record(i).row_id == "np")
    s = ds[i]
    assert ds.modalities()[i] is True and s["has_image"] is False and s["key"] == key
    assert IMAGE_TOKEN not in s["input_ids"].tolist()
    assert np.abs(s["pixel_values"].numpy() - hf_pixels(images[key])).max() <= 1e-6
    np.testing.assert_array_equal(s["targets"]["eva"].numpy(), synth.expected_decoded(manifest)[key]["eva"])
    batch = collate_distill([s, ds[0]], tok.pad_token_id)
    assert batch["has_image"].tolist() == [False, True]


def test_a_cache_with_the_old_zero_no_image_row_is_refused(tmp_path, images, tok):
    path = str(tmp_path / "old")
    manifest = synth.build_cache(path)
    synth.downgrade_to_format_1(path)
    cache = open_cache(path)  # still readable (inspect, verify)
    assert cache.manifest.null_input == "zeros" and cache.manifest.format_version == 1
    with pytest.raises(ValueError, match=r"null_input='zeros'.*--rewrite-null-row") as e:
        build((path, manifest), images, tok)
    assert "\n" not in str(e.value)


def test_invalid_rows_are_skipped_and_counted(ds):
    sk = ds.skipped
    assert sorted(sk) == ["invalid_conversation", "invalid_image", "too_long"]
    assert {r: v["count"] for r, v in sk.items()} == {"invalid_conversation": 1, "invalid_image": 1, "too_long": 1}
    assert FAILED_KEY in sk["invalid_image"]["examples"][0] and "truncated JPEG" in sk["invalid_image"]["examples"][0]
    assert "id bad" in sk["invalid_conversation"]["examples"][0]
    assert "id long" in sk["too_long"]["examples"][0]
    kept = {ds.record(i).row_id for i in range(len(ds))}
    assert not kept & {"bad", "long", "r5"}  # r5 uses the failed image
    assert len(ds.lengths()) == len(ds.modalities()) == len(ds)
    assert ds.lengths()[0] == len("What is in the image? A cat number 0.".split()) + 1  # + "<image>"


def test_read_batch_equals_getitem(ds):
    idx = [3, 0, 11, 3]
    for a, b in zip(ds.read_batch(idx), [ds[i] for i in idx]):
        assert a["key"] == b["key"]
        for name in ("input_ids", "labels", "pixel_values", "cls_state", "cls_attn"):
            assert torch.equal(a[name], b[name])
        assert all(torch.equal(a["targets"][t], b["targets"][t]) for t in a["targets"])


def test_collate_distill(ds, tok):
    samples = ds.read_batch([0, 10, 12])
    batch = collate_distill(samples, tok.pad_token_id)
    text = collate(samples, tok.pad_token_id)
    for name in ("input_ids", "labels", "attention_mask", "pixel_values", "has_image"):
        assert torch.equal(batch[name], text[name])
    assert batch["has_image"].tolist() == [s["has_image"] for s in samples]
    assert batch["targets"]["eva"].shape == (3, 64, 32) and batch["targets"]["convnext"].shape == (3, 4, 64)
    assert batch["cls_state"].shape == (3, 64) and batch["cls_attn"].shape == (3, 16)
    assert batch["keys"] == [s["key"] for s in samples]
    n = samples[0]["input_ids"].shape[0]
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()


def test_teacher_subset(built, images, tok):
    ds = build(built, images, tok, teachers=["clip", "convnext"])
    assert sorted(ds[0]["targets"]) == ["clip", "convnext"]


def _loader_batches(ds, tok, workers):
    sampler = DistributedLengthGroupedSampler.from_dataset(ds, 3, grouping="modality_length", seed=1)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=3,
        sampler=sampler,
        num_workers=workers,
        collate_fn=functools.partial(collate_distill, pad_token_id=tok.pad_token_id),
    )
    return list(dl)


def test_dataloader_workers_give_identical_batches(ds, tok):
    serial, parallel = _loader_batches(ds, tok, 0), _loader_batches(ds, tok, 2)
    assert len(serial) == len(parallel) == 5
    for a, b in zip(serial, parallel):
        assert a["keys"] == b["keys"]
        for name in ("input_ids", "labels", "attention_mask", "pixel_values", "has_image", "cls_state", "cls_attn"):
            assert torch.equal(a[name], b[name]), name
        assert all(torch.equal(a["targets"][t], b["targets"][t]) for t in a["targets"])


def test_encoded_targets_decode_to_the_host_targets(built, images, ds, tok):
    """``encoded_targets=True`` hands over the stored components (bf16 bits, int8 + scales, int4
    nibbles + float16 scales in this cache), in workers too; decoded they are the host targets."""
    from student.target_decode import ENCODED_KEY, decode_batch_targets

    enc = build(built, images, tok, encoded_targets=True)
    m = built[1]
    sample = enc[0]
    assert "targets" not in sample and sorted(sample[ENCODED_KEY]) == sorted(t.name for t in m.teachers)
    for t in m.teachers:
        e = sample[ENCODED_KEY][t.name]
        comps = {c.name: c for c in get_codec(t.codec).components(t.tokens, t.channels)}
        assert e["codec"] == t.codec and sorted(e["parts"]) == sorted(comps)
        for name, part in e["parts"].items():
            assert part.numpy().dtype == np.dtype(comps[name].dtype) and part.shape == comps[name].shape
    host = _loader_batches(ds, tok, 0)
    for workers in (0, 2):
        for a, b in zip(_loader_batches(enc, tok, workers), host):
            assert a["keys"] == b["keys"] and ENCODED_KEY in a and "targets" not in a
            decoded = decode_batch_targets(a)["targets"]
            assert all(torch.equal(decoded[t], b["targets"][t]) for t in b["targets"]), workers
            assert torch.equal(a["cls_state"], b["cls_state"]) and torch.equal(a["pixel_values"], b["pixel_values"])


# -- clear errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,shown",
    [
        ("aspect", "pad", ["'pad'", "'square'"]),
        ("resolution", 64, ["64", "56"]),
        ("interpolation", "bilinear", ["'bilinear'", "'bicubic'"]),
    ],
)
def test_preprocess_mismatch_names_field_and_both_values(built, images, tok, field, value, shown):
    spec = PreprocessSpec(**{**SPEC.to_dict(), field: value})
    with pytest.raises(ValueError, match=f"preprocess.{field}") as e:
        build(built, images, tok, preprocess=spec)
    assert all(s in str(e.value) for s in shown) and "clip" in str(e.value)


def test_aspect_checked_against_every_teacher(tmp_path, images, tok):
    teachers = [
        synth.make_teacher("clip", (4, 4), 64, "bf16", 56),
        synth.make_teacher("eva", (8, 8), 32, "int8", preprocess=PreprocessSpec(112, aspect="pad")),
    ]
    m = synth.make_manifest(teachers=teachers, cls_teacher=None)
    synth.build_cache(str(tmp_path / "c"), m)
    with pytest.raises(ValueError, match=r"preprocess.aspect: student='square'.*'eva'='pad'"):
        build((str(tmp_path / "c"), m), images, tok, require_cls=False, num_image_tokens=16)


def test_unknown_teacher_lists_what_the_cache_has(built, images, tok):
    with pytest.raises(ValueError, match=r"'siglip'.*\['clip', 'eva', 'convnext'\]"):
        build(built, images, tok, teachers=["clip", "siglip"])


def test_uncommitted_shards_refused(tmp_path, images, tok):
    path = str(tmp_path / "partial")
    m = synth.build_cache(path, shards=[0, 2])
    with pytest.raises(ValueError, match=r"1 of 3 shards uncommitted.*movekd extract.*movekd cache verify"):
        build((path, m), images, tok, records=[])


def test_no_cls_teacher(tmp_path, images, tok):
    path = str(tmp_path / "nocls")
    m = synth.build_cache(path, synth.make_manifest(cls=False))
    with pytest.raises(ValueError, match="no cls teacher.*attention-guided KD"):
        build((path, m), images, tok)
    with pytest.raises(ValueError, match="pass num_image_tokens"):
        build((path, m), images, tok, require_cls=False)
    ds = build((path, m), images, tok, require_cls=False, num_image_tokens=16)
    s = ds[0]
    assert "cls_state" not in s and "cls_attn" not in s
    assert "cls_state" not in collate_distill([s, ds[1]], tok.pad_token_id)


def test_image_token_count_must_match_cls_teacher(built, images, tok):
    with pytest.raises(ValueError, match="num_image_tokens=9.*16 tokens"):
        build(built, images, tok, num_image_tokens=9)


def test_missing_null_row_with_text_only_rows(tmp_path, images, tok):
    path = str(tmp_path / "nonull")
    m = synth.build_cache(path, null=False)
    with pytest.raises(ValueError, match="no committed 'no image' row"):
        build((path, m), images, tok)
    image_rows = [r for r in make_records(m) if r.image_key is not None]
    kept = build((path, m), images, tok, records=image_rows)  # no text-only rows: no null row needed
    assert len(kept) == len(image_rows) - 2  # the one-turn "bad" row and the failed image are skipped


def test_keys_missing_from_the_cache(built, images, tok):
    recs = [ConversationRecord("x", "other.json", 7, chat("q", "a"), "deadbeefdeadbeef")]
    with pytest.raises(ValueError, match=r"other.json row 7.*'deadbeefdeadbeef'.*different pack.*toy"):
        build(built, images, tok, records=recs)


def test_loader_errors_name_the_row(built, tok):
    ds = build(built, {}, tok)
    with pytest.raises(ValueError, match=r"toy.json row 0 \(id r0\): cannot load image 'img-000-00'"):
        ds[0]


def test_token_count_precheck_matches_the_tokenizer(ds, tok):
    """The pre-check's batched count is exactly len(input_ids) of tokenize_conversation."""
    for i in range(len(ds)):
        rec = ds.record(i)
        prompt, _ = render(rec.conversations, "vicuna_v1", rec.image_key is not None)
        want = tokenize_conversation(
            rec.conversations,
            tok,
            "vicuna_v1",
            has_image=rec.image_key is not None,
            max_length=10_000,
            num_image_tokens=16,
        )
        assert ds._token_counts([prompt]) == [want["input_ids"].shape[0]]
