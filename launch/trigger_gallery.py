r"""Draws every trigger kind on real test images and measures how visible each one is.

  python launch/trigger_gallery.py --out=docs/triggers.png
  python launch/trigger_gallery.py --gtsrb=../shared/data/gtsrb32.npz --out=docs/triggers.png

Rows: the clean image, then one row per trigger (built with ``trigger_from_config`` like a
training run would, seed ``--seed``); columns: digits test images, GTSRB test images
(when ``--gtsrb`` points to the data), and the absolute change on the last image, scaled
x4. Prints, per trigger, the mean PSNR (dB) of triggered vs clean test images of each
dataset (images the trigger leaves unchanged are left out of the mean).
"""
import os

from absl import flags

_OUT = flags.DEFINE_string("out", "docs/triggers.png", "Output PNG.")
_GTSRB = flags.DEFINE_string("gtsrb", os.path.join("..", "shared", "data", "gtsrb32.npz"),
                             "GTSRB .npz or folder; skipped when it does not exist.")
_PER_DATASET = flags.DEFINE_integer("per_dataset", 3, "Example images per dataset.")
_PSNR_IMAGES = flags.DEFINE_integer("psnr_images", 500, "Test images per dataset for the PSNR table.")
_SEED = flags.DEFINE_integer("seed", 0, "Run seed the random triggers are derived from.")

# (row label, trigger config); missing fields (and a kind's empty section) take the defaults.
GALLERY = (
    ("square 3px white", dict(kind="square", size=3, color="white")),
    ("stripe top-left red", dict(kind="stripe", size=6, color="red")),
    ("3 red dots", dict(kind="dots", size=6, color="red")),
    ("4x4 yellow square", dict(kind="square", size=4, color="yellow")),
    ("blend noise a=0.2", dict(kind="blend", blend=dict(alpha=0.2))),
    ("blend corner a=0.5", dict(kind="blend", blend=dict(alpha=0.5, region="patch"), size=8)),
    ("WaNet k=4 s=0.5", dict(kind="wanet", wanet={})),
    ("WaNet noise mode", dict(kind="wanet", wanet={})),
    ("nashville filter", dict(kind="filter", filter={})),
    ("moire", dict(kind="moire", moire={})),
)


def _psnr(clean, triggered):
  import numpy as np  # pylint: disable=g-import-not-at-top
  mse = ((clean.astype(np.float64) - triggered.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
  mse = mse[mse > 0]
  return float(np.mean(10 * np.log10(255.0 ** 2 / mse))) if len(mse) else float("inf")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from backdoor_jax import cli, triggers  # pylint: disable=g-import-not-at-top
  from backdoor_jax.data import load_dataset  # pylint: disable=g-import-not-at-top
  from backdoor_jax.explain import overlay  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()

  sets = [("digits", load_dataset("digits", image_size=32, seed=_SEED.value))]
  if _GTSRB.value and os.path.exists(_GTSRB.value):
    sets.append(("GTSRB", load_dataset("gtsrb", path=_GTSRB.value, image_size=32, seed=_SEED.value,
                                       max_train=100, max_test=max(_PSNR_IMAGES.value, 43))))
  rng = np.random.default_rng(_SEED.value)
  examples = []
  for name, ds in sets:
    pick = np.sort(rng.choice(len(ds.test_labels), _PER_DATASET.value, replace=False))
    examples += [(f"{name} #{i}", ds.test_images[i]) for i in pick]
  clean = np.stack([im for _, im in examples])
  key = jax.random.fold_in(jax.random.key(_SEED.value), 3)  # as experiment.build_experiment derives it
  rows, cells = ["clean"], [list(clean) + [np.zeros_like(clean[0])]]
  print(f"{'trigger':24s} " + " ".join(f"{name + ' PSNR':>12s}" for name, _ in sets))
  for label, cfg in GALLERY:
    trig = triggers.trigger_from_config(cfg, (32, 32), key)
    noise = label.endswith("noise mode")
    apply = ((lambda x: triggers.apply_noise_warp(trig, x, jax.random.key(1))) if noise
             else (lambda x: triggers.apply_trigger(trig, x)))
    out = np.asarray(apply(clean))
    diff = np.clip(np.abs(out[-1].astype(np.int16) - clean[-1]) * 4, 0, 255).astype(np.uint8)
    rows.append(label)
    cells.append(list(out) + [diff])
    psnrs = []
    for _, ds in sets:
      x = ds.test_images[:_PSNR_IMAGES.value]
      psnrs.append(_psnr(x, np.asarray(apply(x))))
    print(f"{label:24s} " + " ".join(f"{p:12.1f}" for p in psnrs))
  cols = [name for name, _ in examples] + ["|change| x4"]
  overlay.grid_figure(_OUT.value, rows, cols, cells, title="Trigger library (32x32 test images)",
                      cell_inches=0.95, dpi=80)
  print(f"wrote {_OUT.value} ({os.path.getsize(_OUT.value) / 1024:.0f} KB)")


if __name__ == "__main__":
  from backdoor_jax import cli
  cli.run_app(main)
