"""cache.preprocess against Hugging Face's image processors on real photos (skimage.data).

Tolerances: against the PIL-backend processors (``CLIPImageProcessorPil``, ``SamImageProcessorPil``,
the slow processors LLaVA used) we run the identical PIL resize on uint8 and the identical float
ops, so we require max |diff| <= 1e-6 (observed: exactly 0). transformers 5's default processors
resize with torchvision's antialiased kernels instead of PIL's; they round a few pixels to the
neighbouring grey level, so there we bound max |diff| by 3 grey levels (3 / 255 / min(std)) and
the mean by 5e-4.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from skimage import data
from transformers import CLIPImageProcessor, SamImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from cache.manifest import PreprocessSpec
from cache.preprocess import mean_fill_colour, null_image_tensor, preprocess_batch, preprocess_image, to_rgb

EXACT = 1e-6
PHOTOS = {
    "astronaut": data.astronaut,  # 512x512 RGB
    "chelsea": data.chelsea,  # 451x300 RGB, landscape
    "coffee": data.coffee,  # 600x400 RGB, landscape
    "camera": data.camera,  # 512x512 greyscale (mode L)
}


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    out = {name: Image.fromarray(fn()) for name, fn in PHOTOS.items()}
    out["chelsea_portrait"] = out["chelsea"].transpose(Image.Transpose.ROTATE_90)
    return out


def clip_spec(res: int, aspect: str = "square") -> PreprocessSpec:
    return PreprocessSpec(resolution=res, aspect=aspect)


def sam_spec(res: int) -> PreprocessSpec:
    return PreprocessSpec(
        resolution=res,
        resize="longest_edge",
        crop="none",
        pad="bottom_right",
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


def hf(processor, image: Image.Image) -> np.ndarray:
    return processor(images=image, return_tensors="np")["pixel_values"][0]


def torchvision_bound(spec: PreprocessSpec) -> float:
    return 3.0 / 255.0 / min(spec.std)


@pytest.mark.parametrize("res", [336, 224])
def test_clip_matches_hf_pil_processor(photos, res):
    spec = clip_spec(res)
    proc = CLIPImageProcessorPil(size={"shortest_edge": res}, crop_size={"height": res, "width": res})
    for name, image in photos.items():
        ours = preprocess_image(image, spec)
        assert ours.shape == (3, res, res) and ours.dtype == np.float32
        assert np.abs(ours - hf(proc, image)).max() <= EXACT, name


@pytest.mark.parametrize("res", [336, 224])
def test_clip_close_to_hf_torchvision_processor(photos, res):
    spec = clip_spec(res)
    proc = CLIPImageProcessor(size={"shortest_edge": res}, crop_size={"height": res, "width": res})
    for name, image in photos.items():
        diff = np.abs(preprocess_image(image, spec) - hf(proc, image))
        assert diff.max() <= torchvision_bound(spec) and diff.mean() < 5e-4, name


@pytest.mark.parametrize("res", [1024, 64])
def test_sam_matches_hf_processors(photos, res):
    spec = sam_spec(res)
    pil = SamImageProcessorPil(size={"longest_edge": res}, pad_size={"height": res, "width": res})
    tv = SamImageProcessor(size={"longest_edge": res}, pad_size={"height": res, "width": res})
    for name, image in photos.items():
        ours = preprocess_image(image, spec)
        assert ours.shape == (3, res, res)
        assert np.abs(ours - hf(pil, image)).max() <= EXACT, name
        diff = np.abs(ours - hf(tv, image))
        assert diff.max() <= torchvision_bound(spec) and diff.mean() < 5e-4, name


def test_sam_pads_bottom_right_with_zeros(photos):
    ours = preprocess_image(photos["chelsea"], sam_spec(64))  # 451x300 -> 64x43, padded below
    assert np.all(ours[:, 43:, :] == 0) and np.any(ours[:, 42, :] != 0)
    portrait = preprocess_image(photos["chelsea_portrait"], sam_spec(64))  # 300x451 -> 43x64
    assert np.all(portrait[:, :, 43:] == 0) and np.any(portrait[:, :, 42] != 0)


def llava_expand2square(pil_img, background_color):
    """Verbatim from LLaVA (llava/mm_utils.py)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


@pytest.mark.parametrize("name", ["chelsea", "chelsea_portrait", "coffee", "astronaut"])
def test_pad_aspect_is_llava_expand2square(photos, name):
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    image = photos[name]
    expected = hf(proc, llava_expand2square(image, tuple(int(x * 255) for x in proc.image_mean)))
    assert np.abs(preprocess_image(image, clip_spec(336, "pad")) - expected).max() <= EXACT
    assert mean_fill_colour(proc.image_mean) == (122, 116, 104)


def test_grayscale_is_replicated(photos):
    out = preprocess_image(photos["camera"], PreprocessSpec(resolution=64, mean=(0, 0, 0), std=(1, 1, 1)))
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


def _rgba(photos) -> Image.Image:
    rgb = np.asarray(photos["chelsea"])
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    return Image.fromarray(np.dstack([rgb, alpha]))


def _transparent_images() -> dict[str, Image.Image]:
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    la = Image.fromarray(np.dstack([np.zeros((30, 40), np.uint8)] * 2), mode="LA")
    return {"RGBA": Image.new("RGBA", (40, 30), (0, 0, 0, 0)), "P": palette, "LA": la}


def test_alpha_is_dropped_by_default_as_pil_convert_rgb_does(photos):
    """The released loader: ``Image.open(...).convert('RGB')``, then the CLIP processor."""
    rgba = _rgba(photos)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    released = hf(proc, rgba.convert("RGB"))
    assert np.abs(preprocess_image(rgba, clip_spec(224)) - released).max() <= EXACT
    assert np.abs(preprocess_image(rgba, clip_spec(224)) - hf(proc, rgba)).max() > 0.1  # HF composites
    for mode, image in _transparent_images().items():
        assert np.asarray(to_rgb(image)).max() == 0, mode  # the hidden black, as convert('RGB')
        assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB"))), mode


def test_alpha_white_option_composites_on_white(photos):
    rgba = _rgba(photos)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    spec = PreprocessSpec(resolution=224, alpha="white")
    assert np.abs(preprocess_image(rgba, spec) - hf(proc, rgba)).max() <= EXACT
    for mode, image in _transparent_images().items():
        assert np.asarray(to_rgb(image, "white")).min() == 255, mode  # white, not the hidden black
    with pytest.raises(ValueError, match="alpha"):
        PreprocessSpec(resolution=8, alpha="black")


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(mode):
    ramp = (np.arange(256, dtype=np.int64) * 257).reshape(16, 16)  # 0 .. 65535
    image = Image.fromarray(ramp.astype(np.uint16 if mode == "I;16" else np.int32))
    assert image.mode == mode
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (16, 16, 3)
    assert np.array_equal(rgb[..., 0], np.arange(256).reshape(16, 16))


def test_eight_bit_values_in_mode_i_are_kept():
    image = Image.fromarray(np.arange(256, dtype=np.int32).reshape(16, 16))
    assert np.array_equal(np.asarray(to_rgb(image))[..., 1], np.arange(256).reshape(16, 16))


def test_batch_rows_are_hf_results(photos):
    spec = clip_spec(56)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    batch = preprocess_batch([photos["chelsea"], photos["camera"]], spec)
    assert batch.shape == (2, 3, 56, 56)
    for row, name in zip(batch, ("chelsea", "camera")):  # row i is image i, as HF processes it
        assert np.abs(row - hf(proc, photos[name])).max() <= EXACT, name
    assert preprocess_batch([], spec).shape == (0, 3, 56, 56)


def _released_null(processor) -> np.ndarray:
    """What the released model feeds an encoder on a text-only row: the dataset's
    ``torch.zeros(3, 336, 336)`` sent through that encoder's processor (``process_images``)."""
    import torch

    return processor(images=torch.zeros(3, 336, 336), return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("aspect", ["square", "pad"])
def test_null_image_is_the_released_black_input(aspect):
    """CLIP at 336 (student, clip teacher) and 1024 (eva, convnext): -mean/std per channel, equal
    to HF's processor on the released zero tensor and on a black PIL image; not zeros."""
    for res in (336, 1024):
        spec = clip_spec(res, aspect)
        null = null_image_tensor(spec)
        want = (-np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32))[:, None, None]
        assert null.shape == (3, res, res) and null.dtype == np.float32
        assert np.abs(null - want).max() <= EXACT
        np.testing.assert_allclose(want.ravel(), [-1.7923, -1.7521, -1.4802], atol=1e-4)
        proc = CLIPImageProcessorPil(size={"shortest_edge": res}, crop_size={"height": res, "width": res})
        assert np.abs(null - hf(proc, Image.new("RGB", (336, 336)))).max() <= EXACT
        fast = CLIPImageProcessor(size={"shortest_edge": res}, crop_size={"height": res, "width": res})
        assert np.abs(null - _released_null(fast)).max() <= EXACT
    null[:] = 0  # a copy: the cached tensor is not changed
    assert null_image_tensor(clip_spec(1024, aspect)).min() < -1


def test_null_image_for_sam_is_black_everywhere_no_zero_pad():
    spec = sam_spec(1024)
    null = null_image_tensor(spec)
    want = -np.asarray(IMAGENET_DEFAULT_MEAN, np.float32) / np.asarray(IMAGENET_DEFAULT_STD, np.float32)
    assert np.abs(null - want[:, None, None]).max() <= EXACT  # also the bottom/right corner
    np.testing.assert_allclose(want, [-2.1179, -2.0357, -1.8044], atol=1e-4)
    proc = SamImageProcessorPil()
    assert np.abs(null - hf(proc, Image.new("RGB", (336, 336)))).max() <= EXACT
    assert np.abs(null - _released_null(SamImageProcessor())).max() <= EXACT


def test_threads_give_hf_results(photos):
    """Extraction preprocesses in a thread pool: every result must still be HF's, image by image."""
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    names = sorted(photos) * 2
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda n: preprocess_image(photos[n], clip_spec(336)), names))
    for name, out in zip(names, outs):
        assert np.abs(out - hf(proc, photos[name])).max() <= EXACT, name


def test_bad_inputs_raise_value_error(photos):
    with pytest.raises(ValueError, match="PIL.Image"):
        preprocess_image(np.zeros((4, 4, 3), np.uint8), clip_spec(4))
    no_fix = PreprocessSpec(resolution=64, resize="none", crop="none", pad="none")
    with pytest.raises(ValueError, match="not 64x64"):
        preprocess_image(photos["chelsea"], no_fix)
    too_big = PreprocessSpec(resolution=64, resize="none", crop="none", pad="bottom_right")
    with pytest.raises(ValueError, match="already larger"):
        preprocess_image(photos["chelsea"], too_big)


def test_small_image_center_crop_pads_like_hf():
    tiny = Image.fromarray(np.full((10, 12, 3), 200, np.uint8))
    spec = PreprocessSpec(resolution=16, resize="none", crop="center")
    proc = CLIPImageProcessorPil(do_resize=False, crop_size={"height": 16, "width": 16})
    assert np.abs(preprocess_image(tiny, spec) - hf(proc, tiny)).max() <= EXACT


def test_cache_package_does_not_import_torch():
    code = "import sys, cache.preprocess, cache.manifest; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
