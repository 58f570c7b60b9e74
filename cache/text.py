"""Plain-text tables and sizes for the command lines (``movekd cache``, ``movekd extract --dry-run``)."""

from __future__ import annotations

import textwrap

from cache.manifest import PreprocessSpec


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def field_lines(label: str, text: str, width: int = 100, label_width: int = 10) -> list[str]:
    """``label`` padded to ``label_width``, then ``text`` wrapped at spaces to ``width`` columns with
    a hanging indent; a word longer than a line (a path, a URL) is kept whole, never cut."""
    return textwrap.wrap(
        text,
        width,
        initial_indent=label.ljust(label_width - 1) + " ",
        subsequent_indent=" " * label_width,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [label]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def preprocess_summary(p: PreprocessSpec) -> str:
    parts = [f"{p.resolution} {p.resize}", p.interpolation]
    if p.crop != "none":
        parts.append(f"crop {p.crop}")
    if p.pad != "none":
        parts.append(f"pad {p.pad}")
    parts.append(f"aspect {p.aspect}")
    return ", ".join(parts)
