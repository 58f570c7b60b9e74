"""Frozen teacher encoders, looked up by family name (``build_teacher(TeacherSpec(...))``).

Importing this package registers every family (clip, eva_vitdet, eva, convnext, sam, pix2struct,
dinov2, siglip, and the generic ``hf:<path-or-id>`` / ``timm:<model_name>``), each with a builder and a
describer (``describe_teacher``: source, preprocessing, grid and channels without loading
weights); transformers and timm are imported only when a teacher is built or described.
``tiny.make_tiny_teachers`` writes tiny random-weight checkpoints of every family for tests,
the ``tiny`` config and the demo.
"""

from pipeline.teachers import clip, eva_vitdet_teacher, hf, hf_info, timm_teachers  # noqa: F401  (registers the families)
from pipeline.teachers.base import Teacher, TeacherOutput, TeacherSpec, resample_tokens, weights_fingerprint
from pipeline.teachers.registry import (
    TeacherInfo,
    build_teacher,
    describe_teacher,
    list_teachers,
    register_info,
    register_teacher,
)
from pipeline.teachers.tiny import TINY_FAMILIES, make_tiny_teachers

__all__ = [
    "TINY_FAMILIES",
    "Teacher",
    "TeacherInfo",
    "TeacherOutput",
    "TeacherSpec",
    "build_teacher",
    "describe_teacher",
    "list_teachers",
    "make_tiny_teachers",
    "register_info",
    "register_teacher",
    "resample_tokens",
    "weights_fingerprint",
]
