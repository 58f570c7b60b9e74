"""Deterministic image preprocessing: the one function teacher extraction and the student share.

``preprocess_image(image, spec)`` turns a PIL image into the float32 CHW tensor a teacher saw, as
described by a ``PreprocessSpec`` stored in the cache manifest (docs/method.md §3). The student
trainer calls the same function with the same spec, so teacher and student inputs cannot drift.

Decisions:
- Bit-compatible with Hugging Face's PIL image processors (``CLIPImageProcessorPil``,
  ``SamImageProcessorPil``; the slow processors LLaVA was trained with): the same PIL resize on
  uint8 RGB, the same output-size arithmetic (shortest edge: ``int(size * long / short)``; longest
  edge: ``int(side * scale + 0.5)``), crop by slicing, rescale in float64 then cast to float32,
  normalise in float32, zero pad after normalisation. The tests assert a max abs difference of
  1e-6 against them (in practice 0). transformers 5's default ``CLIPImageProcessor`` resizes with
  torchvision instead of PIL, which differs by a few grey levels; the tests bound that separately.
- ``aspect="pad"`` is LLaVA's ``expand2square``: paste the image centred on a square filled with
  ``tuple(int(x * 255) for x in mean)``, before anything else.
- RGB conversion, done first. Alpha (RGBA, LA, PA, palette images with transparency) follows
  ``spec.alpha``: ``drop`` (default) is PIL's ``convert("RGB")``, what the released loader does
  (transparent pixels show whatever colour they hide, often black); ``white`` composites onto
  white, as Hugging Face's processors do. Only images with alpha are affected, and they are rare
  in LLaVA's data. 16-bit greyscale (``I;16*``, and ``I`` images with values above 255) is scaled
  by 1/257 to 8 bits; PIL's own conversion would clip it to white. CMYK uses PIL's conversion,
  the same as LLaVA. EXIF orientation is not applied, matching LLaVA and HF.
- The "no image" input (text-only rows, ``null_image_tensor``) is what the released code really
  feeds every encoder: its ``torch.zeros(3, 336, 336)`` goes through each processor again, which
  makes it a black 336 px square through that encoder's own preprocessing, i.e. ``-mean/std``
  per channel after normalisation (for SAM too: the square is resized to 1024, nothing is
  padded). Not zeros after normalisation (the mean-colour grey of format 1 caches).
- numpy and PIL only: cache/ does not import torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import numpy as np
from PIL import Image

from cache.manifest import PreprocessSpec

_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
NULL_IMAGE_SIDE = 336  # the released null tensor is the student processor's crop size (CLIP-L/336)


def preprocess_image(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """``image`` -> float32 array ``[3, spec.resolution, spec.resolution]`` (see module docstring)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"preprocess_image needs a PIL.Image.Image, got {type(image).__name__}")
    if not isinstance(spec, PreprocessSpec):
        raise ValueError(f"preprocess_image needs a PreprocessSpec, got {type(spec).__name__}")
    rgb = to_rgb(image, spec.alpha)
    if spec.aspect == "pad":
        rgb = expand2square(rgb, mean_fill_colour(spec.mean))
    rgb = _resize(rgb, spec)
    arr = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)  # CHW uint8
    if spec.crop == "center":
        arr = _center_crop(arr, spec.resolution)
    out = (arr.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    out = (out - mean) / std
    if spec.pad == "bottom_right":
        out = _pad_bottom_right(out, spec.resolution)
    if out.shape != (3, spec.resolution, spec.resolution):
        raise ValueError(
            f"preprocess spec (resize={spec.resize!r}, crop={spec.crop!r}, pad={spec.pad!r}) turned a "
            f"{image.size[0]}x{image.size[1]} image into {out.shape[2]}x{out.shape[1]}, not "
            f"{spec.resolution}x{spec.resolution}; use a crop or pad mode that fixes the output size"
        )
    return np.ascontiguousarray(out, dtype=np.float32)


def preprocess_batch(images: Iterable[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """Stack ``preprocess_image`` over images: float32 ``[B, 3, R, R]``."""
    arrays = [preprocess_image(im, spec) for im in images]
    if not arrays:
        return np.zeros((0, 3, spec.resolution, spec.resolution), dtype=np.float32)
    return np.stack(arrays)


def null_image_tensor(spec: PreprocessSpec) -> np.ndarray:
    """The "no image" input: a black ``NULL_IMAGE_SIDE`` square through ``spec`` (module
    docstring), float32 ``[3, R, R]``; ``-mean/std`` per channel for every spec in use."""
    return _null_image(spec).copy()


@functools.lru_cache(maxsize=32)
def _null_image(spec: PreprocessSpec) -> np.ndarray:
    black = Image.new("RGB", (NULL_IMAGE_SIDE, NULL_IMAGE_SIDE), (0, 0, 0))
    out = preprocess_image(black, spec)
    out.setflags(write=False)
    return out


def mean_fill_colour(mean: Iterable[float]) -> tuple[int, ...]:
    """LLaVA's pad colour: ``tuple(int(x * 255) for x in image_processor.image_mean)``."""
    return tuple(int(x * 255) for x in mean)


def expand2square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square``: centre the image on a square canvas of colour ``fill``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def to_rgb(image: Image.Image, alpha: str = "drop") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha dropped as ``convert("RGB")`` does, or with
    ``alpha="white"`` composited onto white; 16-bit scaled; see module docstring)."""
    if alpha not in ("drop", "white"):
        raise ValueError(f"alpha must be 'drop' or 'white', got {alpha!r}")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _sixteen_bit_to_rgb(image)
    try:
        if alpha == "white" and ("A" in image.getbands() or image.info.get("transparency") is not None):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB: {e}") from e


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    arr = np.asarray(image).astype(np.int64)
    if image.mode in _SIXTEEN_BIT_MODES or arr.max(initial=0) > 255:
        arr = np.rint(np.clip(arr, 0, 65535) / 257.0)
    grey = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def output_size(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(height, width) after the resize step, with HF's arithmetic for each mode."""
    size = spec.resolution
    if spec.resize == "shortest_edge":
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if spec.resize == "longest_edge":
        scale = size * 1.0 / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)
    return height, width


def _resize(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    if spec.resize == "none":
        return image
    width, height = image.size
    new_h, new_w = output_size(height, width, spec)
    return image.resize((new_w, new_h), resample=_PIL_FILTERS[spec.interpolation])


def _center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """HF's ``center_crop``: slice, or zero-pad (centred, uint8 zeros) where the image is smaller."""
    _, height, width = arr.shape
    if height < size or width < size:
        new_h, new_w = max(size, height), max(size, width)
        padded = np.zeros((arr.shape[0], new_h, new_w), dtype=arr.dtype)
        top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
        padded[:, top_pad : top_pad + height, left_pad : left_pad + width] = arr
        arr, height, width = padded, new_h, new_w
    top, left = (height - size) // 2, (width - size) // 2
    return arr[:, top : top + size, left : left + size]


def _pad_bottom_right(arr: np.ndarray, size: int) -> np.ndarray:
    _, height, width = arr.shape
    if height > size or width > size:
        raise ValueError(f"cannot pad a {width}x{height} image to {size}x{size}: it is already larger")
    return np.pad(arr, ((0, 0), (0, size - height), (0, size - width)), mode="constant")
