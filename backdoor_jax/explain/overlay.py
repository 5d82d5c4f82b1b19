"""Explanation figures: a colour-mapped map blended over its image, and labelled grids."""
from __future__ import annotations

import io
from typing import Sequence, Union

import chex
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from backdoor_jax.io import write_bytes_atomic  # noqa: E402

# A caption is a string, or (string, matplotlib colour) to highlight it.
Caption = Union[str, tuple[str, str], None]


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 from an (H, W), (H, W, 1) or (H, W, 3) uint8 image."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 pixels; got dtype {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  chex.assert_rank(image, 3)
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  chex.assert_axis_dimension(image, -1, 3)
  return image


def overlay(image_uint8: np.ndarray, map_: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
  """Blends a colour-mapped explanation over an image.

  ``out = (1 - alpha) * image + alpha * 255 * cmap(map)``, rounded to uint8; so
  ``alpha=0`` returns the image and ``alpha=1`` the bare colour map.

  Args:
    image_uint8: (H, W, 3) uint8 image (grey (H, W) / (H, W, 1) is repeated to RGB).
    map_: (H, W) map in [0, 1] (values outside are clipped).
    alpha: weight of the colour map, in [0, 1].
    cmap: a matplotlib colour map name.
  Returns:
    (H, W, 3) uint8.
  Raises:
    ValueError: wrong dtype, shapes that differ, alpha outside [0, 1], unknown cmap.
  """
  image = _rgb_uint8(image_uint8)
  m = np.asarray(map_, np.float64)
  chex.assert_rank(m, 2)
  if m.shape != image.shape[:2]:
    raise ValueError(f"map shape {m.shape} differs from the image's {image.shape[:2]}; upsample the map first")
  if not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"alpha={alpha} must be in [0, 1]")
  colours = plt.get_cmap(cmap)(np.clip(np.nan_to_num(m), 0.0, 1.0))[..., :3] * 255.0
  out = (1.0 - alpha) * image.astype(np.float64) + alpha * colours
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _caption(ax, caption: Caption) -> None:
  if caption is None:
    return
  text, colour = (caption, "black") if isinstance(caption, str) else caption
  ax.set_xlabel(text, fontsize=7, color=colour, labelpad=2)


def _draw_outline(ax, mask: np.ndarray, colour: str = "white") -> None:
  """Draws the pixel-exact boundary of a boolean (H, W) mask over an imshow'n cell."""
  m = np.pad(np.asarray(mask, bool), 1)
  vertical = m[1:-1, 1:] != m[1:-1, :-1]    # (H, W + 1): an edge left of column j
  horizontal = m[1:, 1:-1] != m[:-1, 1:-1]  # (H + 1, W): an edge above row i
  segs = [[(j - 0.5, i - 0.5), (j - 0.5, i + 0.5)] for i, j in zip(*np.nonzero(vertical))]
  segs += [[(j - 0.5, i - 0.5), (j + 0.5, i - 0.5)] for i, j in zip(*np.nonzero(horizontal))]
  if segs:
    ax.add_collection(LineCollection(segs, colors=colour, linewidths=0.9), autolim=False)


def grid_figure(path: str, rows: Sequence[str], cols: Sequence[str], cells: Sequence[Sequence[np.ndarray]],
                title: str | None = None, captions: Sequence[Sequence[Caption]] | None = None,
                outlines: Sequence[Sequence[np.ndarray | None]] | None = None,
                cell_inches: float = 1.35, dpi: int = 100) -> None:
  """Writes a labelled grid of images as a PNG, atomically.

  Small images are drawn with nearest-neighbour interpolation (pixels stay sharp).

  Args:
    path: output .png path (folders are created).
    rows: one label per row, drawn left of the row.
    cols: one label per column, drawn above the top row.
    cells: ``len(rows)`` lists of ``len(cols)`` uint8 images ((H, W, 3) or grey);
      ``None`` leaves a cell blank.
    title: optional figure title.
    captions: optional, like ``cells``: a short text under each cell (``str`` or
      ``(str, colour)``), e.g. a prediction.
    outlines: optional, like ``cells``: a bool (H, W) mask whose boundary is drawn
      over the cell (e.g. the trigger region), or None.
    cell_inches: size of one cell.
    dpi: resolution of the PNG.
  Raises:
    ValueError: the numbers of labels, cells and captions disagree.
  """
  n_rows, n_cols = len(rows), len(cols)
  if n_rows == 0 or n_cols == 0:
    raise ValueError("grid_figure needs at least one row and one column")
  if len(cells) != n_rows or any(len(r) != n_cols for r in cells):
    raise ValueError(f"cells must be {n_rows} rows of {n_cols} images")
  for what, extra in (("captions", captions), ("outlines", outlines)):
    if extra is not None and (len(extra) != n_rows or any(len(r) != n_cols for r in extra)):
      raise ValueError(f"{what} must be {n_rows} rows of {n_cols} entries")
  row_h = cell_inches + (0.22 if captions is not None else 0.0)
  fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_inches * n_cols + 1.2, row_h * n_rows + 0.5),
                           squeeze=False, layout="constrained")
  # Constrained layout reserves room for the row labels; tight_layout let each image
  # axes overlap its right neighbour, hiding that image's right edge (a corner trigger).
  fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
  for i in range(n_rows):
    for j in range(n_cols):
      ax = axes[i, j]
      ax.set_xticks([]), ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_visible(False)
      if cells[i][j] is not None:
        ax.imshow(_rgb_uint8(cells[i][j]), interpolation="nearest")
      if outlines is not None and outlines[i][j] is not None:
        _draw_outline(ax, outlines[i][j])
      if captions is not None:
        _caption(ax, captions[i][j])
    axes[i, 0].set_ylabel(rows[i], fontsize=8, rotation=0, ha="right", va="center", labelpad=4)
  for j in range(n_cols):
    axes[0, j].set_title(cols[j], fontsize=8)
  if title:  # above the axes (and their column labels); bbox_inches='tight' keeps it in the PNG
    fig.suptitle(title, fontsize=9, y=1.0, va="bottom")
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  write_bytes_atomic(path, buf.getvalue())
