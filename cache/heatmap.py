"""Pictures and numbers of one image's [CLS] attention, for ``movekd cache attn`` and ``show``.

Decisions:
- The colour scale is attention against uniform, never autoscaled to the row's own range (which
  makes a near-uniform row look as structured as a peaked one): each token shows
  ``a / mean(a) = N * a / sum(a)`` ("x uniform": 1 = the share a token gets from a uniform row,
  1/N of the row's sum), on a log scale symmetric around 1: 1/r .. r with r the row's peak, at
  least 2 (so a flat row stays in the middle of the scale), at most 1000. A diverging colour
  map puts uniform at its neutral grey, so a flat row draws flat and the colour bar reads in
  multiples of uniform. The title states the row's max/min against uniform and its entropy
  against the maximum, log N.
- Matplotlib's object API on a bare ``Figure`` (Agg), never pyplot: no global backend state is
  touched. ``draw_attention`` returns the figure, so a caller can read back what it drew.
- The picture under ``attn --image`` goes through the teacher's own preprocessing (its
  ``PreprocessSpec``), so the grid lines up with what the teacher saw.
"""

from __future__ import annotations

import numpy as np

from cache.manifest import PreprocessSpec, TeacherEntry
from cache.preprocess import preprocess_image

MIN_RANGE = 2.0  # the colour scale spans at least 1/2 .. 2 x uniform
MAX_RANGE = 1000.0
CMAP = "coolwarm"


def x_uniform(attn: np.ndarray) -> np.ndarray | None:
    """Each entry as a multiple of the row's mean (N * a / sum(a)); None for a row summing to 0."""
    a = np.asarray(attn, dtype=np.float64)
    total = a.sum()
    return a * a.size / total if total > 0 else None


def attention_stats(attn: np.ndarray, teacher: TeacherEntry) -> dict:
    """Entropy (nats, of the row normalised to sum 1) against its maximum log N, max and min as
    multiples of uniform, and the argmax as (row, col) of the grid."""
    a = attn.astype(np.float64)
    total = a.sum()
    p = a / total if total > 0 else np.full_like(a, 1.0 / a.size)
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    ratio = x_uniform(a)
    arg = int(a.argmax())
    return {
        "teacher": teacher.name,
        "grid": list(teacher.grid),
        "sum": float(total),
        "entropy": entropy,
        "max_entropy": float(np.log(a.size)),
        "max": float(a.max()),
        "max_x_uniform": None if ratio is None else float(ratio.max()),
        "min_x_uniform": None if ratio is None else float(ratio.min()),
        "argmax_token": arg,
        "argmax_rc": list(divmod(arg, teacher.grid[1])),
    }


def times(v: float) -> str:
    """A multiple of uniform for a title: 0.0012x, 0.53x, 8.00x, 41.3x, 115x."""
    if v < 0.1:
        return f"{v:.2g}x"
    return f"{v:.2f}x" if v < 10 else f"{v:.1f}x" if v < 100 else f"{v:.0f}x"


def color_range(ratio: np.ndarray) -> float:
    """r of the log range 1/r .. r, symmetric around uniform: the row's peak, within MIN_RANGE ..
    MAX_RANGE. Tokens below 1/r are drawn at 1/r (the colour bar's lower end is an arrow then):
    attention is read at its peaks, and 0.01x and 0.001x of uniform both mean "not looked at"."""
    return float(min(max(float(ratio.max()), MIN_RANGE), MAX_RANGE))


def _ticks(r: float) -> list[float]:
    base = 2.0 if r <= 16 else 10.0
    k = int(np.floor(np.log(r) / np.log(base) + 1e-9))
    return [base**i for i in range(-k, k + 1)]


def draw_attention(heat: np.ndarray, out: str, title: str, picture: np.ndarray | None = None, alpha: float = 0.6):
    """Save ``heat`` (grid rows x cols, attention weights) as a PNG heatmap in multiples of
    uniform, with a colour bar, over ``picture`` if given; return the matplotlib ``Figure``."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend switch
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    heat = np.asarray(heat, dtype=np.float64)
    ratio = x_uniform(heat)
    if ratio is None:
        raise ValueError(f"{title}: the [CLS] attention row sums to 0; there is nothing to draw")
    n, p = heat.size, heat / heat.sum()
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    r = color_range(ratio)
    norm = LogNorm(vmin=1.0 / r, vmax=r, clip=True)
    fig = Figure(figsize=(5.5, 4.6), dpi=100)
    ax = fig.add_subplot()
    if picture is None:
        im = ax.imshow(ratio, cmap=CMAP, norm=norm, interpolation="nearest")
    else:
        h, w = picture.shape[:2]
        ax.imshow(picture, extent=(0, w, h, 0))
        im = ax.imshow(ratio, cmap=CMAP, norm=norm, alpha=alpha, extent=(0, w, h, 0), interpolation="bilinear")
    solid = ScalarMappable(norm=im.norm, cmap=im.cmap)  # the colorbar without the overlay's alpha
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[
        (bool(ratio.min() < 1.0 / r), bool(ratio.max() > r))
    ]
    bar = fig.colorbar(solid, ax=ax, extend=extend, label=f"x uniform (1/N = {1 / n:.3g}, N = {n})")
    bar.ax.yaxis.set_major_locator(FixedLocator(_ticks(r)))
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    bar.ax.yaxis.set_minor_locator(NullLocator())
    ax.set_title(
        f"{title}\nmax {times(ratio.max())}, min {times(ratio.min())} uniform; "
        f"entropy {entropy:.3g} of max {np.log(n):.3g} nats",
        fontsize=9,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    fig.savefig(out, format="png")
    return fig


def load_image(path: str):
    """A PIL image read whole (ValueError naming the file when it is not a readable image)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def teacher_view(image, spec: PreprocessSpec) -> np.ndarray:
    """The picture a teacher saw (uint8 HxWx3): its exact preprocessing, un-normalised."""
    x = preprocess_image(image, spec)
    mean, std = np.asarray(spec.mean)[:, None, None], np.asarray(spec.std)[:, None, None]
    return (np.clip(x * std + mean, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(1, 2, 0)
