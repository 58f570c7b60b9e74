"""``eva_vitdet``: the released MoVE-KD ``eva`` teacher (EVA-02-L ViTDet, COCO det + o365).

``TeacherSpec(name="eva", family="eva_vitdet", source=".../eva02_L_coco_det_sys_o365.pth")``
builds ``pipeline.teachers.eva_vitdet.EvaViTDet`` (``model_kwargs`` override its config, e.g. a
tiny one for tests; the image size is ``resolution``, default 1024) and emits the last block's
tokens row-major, ``[B, 4096, 1024]`` at 1024 px.

Decisions:
- Loading as released: the state dict is ``ema_state``, else ``module``, else ``model`` (a
  detectron2 checkpoint), else the file's dict itself; of it the keys containing ``backbone.net.``
  are kept with that prefix removed (a file without any such key is taken as an already stripped
  backbone); ``rope`` buffers are skipped (recomputed). Unlike the released loader
  (``strict=False`` with warnings), the load is strict: a missing, unexpected or differently shaped
  backbone key is a ``ValueError`` naming it.
- Safely: ``.pth``/``.pt``/``.bin`` go through ``torch.load(weights_only=True)``; a checkpoint that
  needs pickle (trainer state, an argparse Namespace...) is refused with the three lines of python
  that convert it to ``.safetensors`` in a trusted environment. ``.safetensors`` files with the
  same keys load directly.
- No default download: the file is not on a hub the project can fetch from, so ``source`` must name
  it for a build; describing the teacher (``movekd extract --dry-run``) needs no file.
- Attention runs through SDPA; on CUDA with a 16-bit compute dtype the flash kernel is preferred
  (then memory-efficient, then math), as the project's HF teachers prefer flash-attention-2.
- Preprocessing: CLIPImageProcessor at the image size (shortest edge, centre crop, CLIP mean/std,
  bicubic), with the spec's aspect mode like every teacher.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch

from pipeline.teachers.base import NativeOutput, Teacher, TeacherSpec, clip_style_preprocess
from pipeline.teachers.eva_vitdet import EvaViTDet, EvaViTDetConfig
from pipeline.teachers.registry import TeacherInfo, make_info, register_info, register_teacher

FAMILY = "eva_vitdet"
RELEASED_FILE = "eva02_L_coco_det_sys_o365.pth"
RELEASED_URL = "https://huggingface.co/Yuxin-CV/EVA-02/blob/main/eva02/det/" + RELEASED_FILE
BACKBONE_PREFIX = "backbone.net."
NESTING_KEYS = ("ema_state", "module", "model")
LAYER = "last block output [B, H, W, C] (no final norm, no CLS token), tokens row-major"


def eva_vitdet_config(spec: TeacherSpec) -> EvaViTDetConfig:
    """The architecture of ``spec``: the released one with ``model_kwargs`` applied, at ``resolution``."""
    kwargs = dict(spec.model_kwargs)
    resolution = spec.resolution or kwargs.get("img_size") or EvaViTDetConfig.img_size
    if kwargs.setdefault("img_size", resolution) != resolution:
        raise ValueError(f"teacher {spec.name}: model_kwargs img_size {kwargs['img_size']} != resolution {resolution}")
    if spec.layer is not None:
        raise ValueError(f"teacher {spec.name}: family {FAMILY} emits the last block only; leave 'layer' unset")
    try:
        return EvaViTDetConfig.from_dict(kwargs)
    except ValueError as e:
        raise ValueError(f"teacher {spec.name}: {e}") from e


@register_info(FAMILY)
def eva_vitdet_info(spec: TeacherSpec) -> TeacherInfo:
    cfg = eva_vitdet_config(spec)
    preprocess = clip_style_preprocess(cfg.img_size, spec.aspect)
    return make_info(spec, preprocess, LAYER, (cfg.grid, cfg.grid), cfg.embed_dim)


# -- checkpoints -------------------------------------------------------------------------------
def conversion_snippet(path: str) -> str:
    """Three lines of python that turn a pickled checkpoint into a ``.safetensors`` this loader reads."""
    out = os.path.splitext(path)[0] + ".safetensors"
    return (
        "import torch; from safetensors.torch import save_file\n"
        f"ck = torch.load({path!r}, map_location='cpu', weights_only=False)\n"
        "sd = next((ck[k] for k in ('ema_state', 'module', 'model') if k in ck), ck); save_file({k: v.contiguous()"
        f".clone() for k, v in sd.items() if torch.is_tensor(v) and 'rope' not in k}}, {out!r})"
    )


def read_checkpoint(path: str, what: str) -> Mapping:
    """The raw mapping in ``path`` (safetensors, or a torch file loaded with ``weights_only=True``)."""
    if not os.path.isfile(path):
        raise ValueError(f"{what}: checkpoint {path!r} does not exist (the released one is {RELEASED_URL})")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{what}: cannot read safetensors {path!r}: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(e)
        raise ValueError(
            f"{what}: {path!r} needs pickle to load and is refused (torch.load(weights_only=True): {reason}); "
            "convert it once to safetensors in a trusted environment and set source to the new file:\n"
            + conversion_snippet(path)
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{what}: cannot read {path!r} as a torch checkpoint: {e}") from e


def _unpickler_reason(e: Exception) -> str:
    """The line of torch's weights-only error that names what needs pickle (e.g. a global)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "WeightsUnpickler" in line]
    reason = (named or lines or [type(e).__name__])[0].removeprefix("WeightsUnpickler error: ")
    return reason.split(". Please use")[0]


def backbone_state(checkpoint: Mapping, what: str) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a released-layout checkpoint, prefix removed, ``rope`` skipped."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{what}: the checkpoint holds a {type(checkpoint).__name__}, not a state dict")
    state = next((checkpoint[k] for k in NESTING_KEYS if isinstance(checkpoint.get(k), Mapping)), checkpoint)
    if any(BACKBONE_PREFIX in k for k in state):
        state = {k.replace(BACKBONE_PREFIX, ""): v for k, v in state.items() if BACKBONE_PREFIX in k}
    state = {k: v for k, v in state.items() if "rope" not in k}
    odd = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if odd:
        raise ValueError(f"{what}: backbone entries {odd[:6]} are not tensors")
    return state


def load_backbone(model: EvaViTDet, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict: every parameter of ``model`` from ``state`` and nothing else, shapes equal."""
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} (model {tuple(want[k].shape)})"
        for k in set(want) & set(state)
        if tuple(state[k].shape) != tuple(want[k].shape)
    )
    problems = [
        f"{label} {keys[:6]}{'...' if len(keys) > 6 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
        if keys
    ]
    if problems:
        raise ValueError(
            f"{what}: not an EVA-02 ViTDet backbone of config {model.cfg.to_dict()}: " + "; ".join(problems)
        )
    model.load_state_dict(dict(state), strict=True)


def load_eva_vitdet(spec: TeacherSpec) -> EvaViTDet:
    """The model of ``spec`` with the weights of ``spec.source`` (see module docstring)."""
    what = f"teacher {spec.name}"
    if not spec.source:
        raise ValueError(
            f"{what}: family {FAMILY} needs 'source', the path of {RELEASED_FILE} ({RELEASED_URL}) "
            "or of its safetensors conversion"
        )
    model = EvaViTDet(eva_vitdet_config(spec))
    load_backbone(model, backbone_state(read_checkpoint(spec.source, what), what), what)
    return model


# -- the teacher -------------------------------------------------------------------------------
def sdpa_backends(device: torch.device, dtype: torch.dtype) -> list | None:
    """SDPA kernels in order of preference, or None for PyTorch's own choice (CPU, fp32)."""
    from torch.nn.attention import SDPBackend

    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return None


class EvaViTDetTeacher(Teacher):
    def _forward(self, pixels: torch.Tensor) -> NativeOutput:
        backends = sdpa_backends(self.device, self.dtype)
        if backends is None:
            feats = self.model(pixels)
        else:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(backends, set_priority=True):
                feats = self.model(pixels)
        b, h, w, c = feats.shape
        return NativeOutput(tokens=feats.reshape(b, h * w, c), grid=(h, w))


@register_teacher(FAMILY)
def build_eva_vitdet(spec: TeacherSpec, device: torch.device) -> Teacher:
    info = eva_vitdet_info(spec)
    model = load_eva_vitdet(spec)
    arch = {"arch": FAMILY, "config": model.cfg.to_dict()}
    return EvaViTDetTeacher(spec, model, device, info.preprocess, layer=LAYER, arch_info=arch)
