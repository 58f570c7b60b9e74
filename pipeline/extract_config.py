"""``ExtractConfig``: everything an extraction run needs, built in one place.

Named presets (YAML with ``base:`` chains and ``--set`` overrides) are resolved by ``jobs.config``;
this module only defines and validates the dataclass. Library code never reads YAML,
``sys.argv`` or the environment. ``packed`` and ``out`` may be left unset (None) to describe a
preset (``movekd extract --dry-run``); running it needs both (``require_io``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cache.codecs import get_codec
from cache.strict import from_mapping
from pipeline.teachers import TeacherSpec


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction run: packed input -> cache.

    ``codec`` applies to every teacher unless ``codecs`` names one for it. ``aspect`` (``square``
    or ``pad``), when set, overrides every teacher's LLaVA aspect mode; ``alpha`` (``drop``, as
    released, or ``white``), when set, every teacher's alpha mode. ``num_workers`` actors are
    started, each with ``gpus_per_worker`` GPUs (``device: cuda``) or ``cpus_per_worker`` CPUs.
    A failed shard is retried after ``retry_backoff_s``, doubling per attempt up to
    ``retry_backoff_max_s``. ``claim_lease_s`` is how long a shard claim lasts unless renewed
    (FORMAT.md section 6): a driver that died on another host blocks its shards that long.
    """

    packed: str | None
    out: str | None
    teachers: tuple[TeacherSpec, ...]
    codec: str = "int8"
    codecs: Mapping[str, str] = field(default_factory=dict)
    cls_teacher: str | None = "clip"
    aspect: str | None = None
    alpha: str | None = None
    dataset_name: str = ""
    batch_size: int = 8
    device: str = "auto"
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    decode_threads: int = 4
    prefetch_batches: int = 2
    max_shard_retries: int = 2
    worker_start_timeout_s: float = 1800.0  # a worker not started (placed + teachers loaded) by then: error
    retry_backoff_s: float = 2.0
    retry_backoff_max_s: float = 60.0
    claim_lease_s: float = 120.0
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    report: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.teachers, (list, tuple)):
            raise ValueError(f"teachers must be a list of teacher specs, got {type(self.teachers).__name__}")
        teachers = tuple(t if isinstance(t, TeacherSpec) else TeacherSpec.from_dict(t) for t in self.teachers)
        if self.aspect is not None:
            if self.aspect not in ("square", "pad"):
                raise ValueError(f"aspect must be 'square' or 'pad', got {self.aspect!r}")
            teachers = tuple(dataclasses.replace(t, aspect=self.aspect) for t in teachers)
        if self.alpha is not None:
            teachers = tuple(dataclasses.replace(t, alpha=self.alpha) for t in teachers)  # TeacherSpec checks it
        object.__setattr__(self, "teachers", teachers)
        object.__setattr__(self, "codecs", dict(self.codecs))
        names = [t.name for t in teachers]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"teachers must be a non-empty list of unique names, got {names}")
        unknown = sorted(set(self.codecs) - set(names))
        if unknown:
            raise ValueError(f"codecs names teacher(s) {unknown} that are not in teachers {names}")
        for name in names:
            get_codec(self.codec_for(name))  # fails early on unknown codec names
        if self.cls_teacher is not None and self.cls_teacher not in names:
            raise ValueError(f"cls_teacher {self.cls_teacher!r} is not among the teachers {names}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for k in ("batch_size", "num_workers", "decode_threads", "prefetch_batches"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("retry_backoff_s", "retry_backoff_max_s"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.claim_lease_s < 1:
            raise ValueError(f"claim_lease_s must be >= 1 (seconds), got {self.claim_lease_s}")

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait before retrying a shard that failed ``attempt`` times (exponential, capped)."""
        return min(self.retry_backoff_max_s, self.retry_backoff_s * 2 ** (attempt - 1))

    def codec_for(self, teacher: str) -> str:
        return self.codecs.get(teacher, self.codec)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["teachers"] = [t.to_dict() for t in self.teachers]
        d["codecs"] = dict(self.codecs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExtractConfig:
        if isinstance(d, Mapping):
            d = {"packed": None, "out": None, **d}
        return from_mapping(cls, d, "extraction config")

    def require_io(self) -> None:
        """Raise naming ``packed``/``out`` when a run would need them and they are unset."""
        missing = sorted(k for k in ("packed", "out") if not getattr(self, k))
        if missing:
            raise ValueError(
                f"extraction config is missing {missing}: set them in the YAML, with --set KEY=VALUE, "
                "or with --packed/--out"
            )
