"""Grad-CAM report of a trained run: where do its explanations look, with and without the trigger?

The library side of ``launch/explain.py``. :func:`explain_run` loads a training work
dir (``train.restore.load_run``), rebuilds its test data and trigger with
``train.loop.build_experiment`` and writes into ``WORKDIR/explain/``:

* ``gradcam_clean_vs_triggered.png``: test images and their triggered versions, with
  the Grad-CAM of the run (and of a clean reference run) and each model's prediction;
* ``layers.png``: the run's Grad-CAM at every spatial layer;
* ``feature_maps.png``: the per-feature-map maps ReLU(w_k A_k) of the channels with the
  largest weights w_k for a triggered image, next to the same channels on its clean version;
* ``explain.json``: per model and per image set (clean test images; triggered
  non-target test images), scores of the Grad-CAM maps against the trigger's region:
  mean energy fraction inside it, pointing-game hit rate, IoU summary, plus accuracy
  (and the ASR on the triggered set), for the chosen layer and, in ``by_layer``, for
  every spatial layer. ``thresholds.iou_map``: a map pixel counts as explanation when
  above it; ``thresholds.iou_gt``: the IoU above which an image counts in ``gt_05``.

The scores cover every image of each set (jit-compiled, fixed-size batches); only the
figures use a few images. Grad-CAM explains each image's *predicted* class, so on a
backdoored model a triggered image is explained as the target class.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import config_dict

from backdoor_jax import io
from backdoor_jax.data import pipeline
from backdoor_jax.errors import ConfigError
from backdoor_jax.explain import core, metrics, overlay
from backdoor_jax.explain.gradcam import cam_from, finish, gradcam
from backdoor_jax.explain.methods import feature_map_cams, forward_layers
from backdoor_jax.train import loop, restore, steps

FILES = ("gradcam_clean_vs_triggered.png", "layers.png", "feature_maps.png", "explain.json")


@dataclasses.dataclass
class _Model:
  """A loaded run plus the Grad-CAM layer chosen for it."""
  role: str                      # 'run' or 'reference'
  run: restore.TrainedRun
  layer: str
  spatial: tuple[str, ...]       # spatial layers in forward order
  shapes: dict[str, tuple[int, ...]]
  jitted: dict[Any, Callable[..., Any]] = dataclasses.field(default_factory=dict)

  @property
  def apply_fn(self) -> Callable[..., Any]:
    return self.run.model.apply


def default_layer(spatial: tuple[str, ...], shapes: dict[str, tuple[int, ...]]) -> str:
  """The deepest spatial layer whose map is larger than 1x1 (else the deepest one).

  A 1x1 map carries no location (it normalises to all zeros), so it is skipped.
  """
  if not spatial:
    raise ConfigError("the model exposes no spatial (B, h, w, K) layer; Grad-CAM needs one")
  big = [n for n in spatial if shapes[n][1] * shapes[n][2] > 1]
  return (big or list(spatial))[-1]


def _load(role: str, workdir: str, layer: str | None) -> _Model:
  run = restore.load_run(workdir)
  dummy = jnp.zeros((1,) + tuple(run.image_shape), jnp.float32)
  info = forward_layers(run.model.apply, run.variables, dummy)
  spatial = info.spatial
  if layer:
    if layer not in spatial:
      raise ConfigError(f"unknown layer {layer!r} for the {role} model ({run.config.model.name}); "
                        f"valid (spatial) layers: {', '.join(spatial)}")
  else:
    layer = default_layer(spatial, info.shapes)
  return _Model(role, run, layer, spatial, info.shapes)


def _check_reference(model: _Model, ref: _Model) -> None:
  if tuple(ref.run.image_shape) != tuple(model.run.image_shape):
    raise ConfigError(f"reference run {ref.run.workdir} takes {tuple(ref.run.image_shape)} inputs but the run "
                      f"{model.run.workdir} takes {tuple(model.run.image_shape)}; use a reference trained on the "
                      "same data")
  if ref.run.num_classes != model.run.num_classes:
    raise ConfigError(f"reference run {ref.run.workdir} has {ref.run.num_classes} classes but the run has "
                      f"{model.run.num_classes}; use a reference trained on the same data")
  if ref.run.config.data.name != model.run.config.data.name:
    logging.warning("reference was trained on %s, the run on %s", ref.run.config.data.name,
                    model.run.config.data.name)


def make_scorer(apply_fn: Callable[..., Any], spec: steps.InputSpec, layers: list[str],
                iou_threshold: float) -> Callable[..., dict[str, Any]]:
  """A jitted ``score(variables, images_uint8, region) -> per-image dict``.

  One forward and one backward pass give Grad-CAM of the predicted class at every
  layer of ``layers``. The dict holds ``pred`` (B,) and, per layer, ``energy`` (B,)
  fraction of the map inside the region, ``pointing`` (B,) bool and ``iou`` (B,) of
  ``maps > iou_threshold`` with the region.
  """
  def score(variables, images, region):
    chex.assert_rank(images, 4)
    x = steps.preprocess(None, images, spec)
    out = core.activations_and_gradients(apply_fn, variables, x, None, layers)
    per_layer = {}
    for name in layers:
      maps = finish(cam_from(out["activations"][name], out["gradients"][name]), x.shape[1:3]).maps
      per_layer[name] = {"energy": metrics.energy_in_region(maps, region),
                         "pointing": metrics.pointing_game(maps, region),
                         "iou": metrics.iou(maps, region, threshold=iou_threshold)}
    return {"pred": jnp.argmax(out["logits"], -1), "layers": per_layer}
  return jax.jit(score)


def score_set(scorer: Callable[..., dict[str, Any]], variables: Any, images: np.ndarray, labels: np.ndarray,
              region: jax.Array, batch_size: int, layer: str,
              attack_labels: np.ndarray | None = None) -> dict[str, Any]:
  """Scores every image of a set in fixed-size batches (one compilation).

  Args:
    scorer: from :func:`make_scorer`.
    variables: the model's variables.
    images: (N, H, W, 3) uint8.
    labels: (N,) true classes.
    region: (H, W) bool region.
    batch_size: images per batch (the last batch is padded and masked).
    layer: the layer of the main scores (one of the scorer's layers).
    attack_labels: (N,) classes the backdoor aims at (adds ``attack_success_rate``).
  Returns:
    JSON-ready dict: ``count``, ``accuracy``, at ``layer`` ``energy_in_trigger`` (mean),
    ``energy_in_trigger_median``, ``pointing_game`` (hit rate), ``iou`` (summary);
    ``attack_success_rate`` when ``attack_labels`` is given; and ``by_layer``: the mean
    energy, pointing-game rate and mean IoU at every scored layer.
  """
  preds, parts = [], {}
  for idx, valid in pipeline.eval_batches(len(labels), batch_size):
    out = jax.device_get(scorer(variables, jnp.asarray(images[idx]), region))
    preds.append(np.asarray(out["pred"])[valid])
    for name, scores in out["layers"].items():
      for k, v in scores.items():
        parts.setdefault(name, {}).setdefault(k, []).append(np.asarray(v)[valid])
  n = int(len(labels))
  if not n:
    return {"count": 0, "accuracy": 0.0, "energy_in_trigger": 0.0, "energy_in_trigger_median": 0.0,
            "pointing_game": 0.0, "iou": {"mean": 0.0, "median": 0.0, "std": 0.0, "gt_05": 0.0},
            **({"attack_success_rate": 0.0} if attack_labels is not None else {}), "by_layer": {}}
  pred = np.concatenate(preds)
  cat = {name: {k: np.concatenate(v) for k, v in d.items()} for name, d in parts.items()}
  main = cat[layer]
  res = {"count": n, "accuracy": float(np.mean(pred == labels)),
         "energy_in_trigger": float(np.mean(main["energy"])),
         "energy_in_trigger_median": float(np.median(main["energy"])),
         "pointing_game": float(np.mean(main["pointing"])),
         "iou": {k: float(v) for k, v in metrics.iou_summary(jnp.asarray(main["iou"], jnp.float32)).items()}}
  if attack_labels is not None:
    res["attack_success_rate"] = float(np.mean(pred == attack_labels))
  res["by_layer"] = {name: {"energy_in_trigger": float(np.mean(d["energy"])),
                            "pointing_game": float(np.mean(d["pointing"])), "iou_mean": float(np.mean(d["iou"]))}
                     for name, d in cat.items()}
  return res


def _cams(model: _Model, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Predictions and normalised Grad-CAM maps of a few uint8 images at every spatial layer (jitted)."""
  key = "cams"
  if key not in model.jitted:
    spec, apply_fn, layers = model.run.input_spec, model.apply_fn, list(model.spatial)

    def cams(variables, images):
      x = steps.preprocess(None, images, spec)
      pred = jnp.argmax(apply_fn(variables, x, train=False), -1)
      return pred, {k: v.maps for k, v in gradcam(apply_fn, variables, x, None, layers).items()}
    model.jitted[key] = jax.jit(cams)
  pred, maps = jax.device_get(model.jitted[key](model.run.variables, jnp.asarray(images)))
  return np.asarray(pred), {k: np.asarray(v) for k, v in maps.items()}


def _feature_maps(model: _Model, images: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                           np.ndarray]:
  """Predictions, Grad-CAM maps, per-channel maps (B, K, H, W) and weights (B, K) (jitted, cached)."""
  key = ("feature_maps", layer)
  if key not in model.jitted:
    spec, apply_fn = model.run.input_spec, model.apply_fn

    def fmaps(variables, images):
      x = steps.preprocess(None, images, spec)
      pred = jnp.argmax(apply_fn(variables, x, train=False), -1)
      fm = feature_map_cams(apply_fn, variables, x, None, layer)
      return pred, gradcam(apply_fn, variables, x, None, layer)[layer].maps, fm.maps, fm.weights
    model.jitted[key] = jax.jit(fmaps)
  return tuple(np.asarray(a) for a in jax.device_get(model.jitted[key](model.run.variables, jnp.asarray(images))))


def _name(class_names: tuple[str, ...], i: int) -> str:
  return str(class_names[int(i)]) if int(i) < len(class_names) else str(int(i))


def _gradcam_figure(path: str, models: list[_Model], clean: np.ndarray, trig: np.ndarray, labels: np.ndarray,
                    attack: np.ndarray, src: np.ndarray, region: jax.Array, target_desc: str) -> None:
  run = models[0].run
  names = run.class_names
  rows, cells, caps = [], [], []
  box = [None] + [np.asarray(region)] * len(models)
  per_model = []
  for m in models:
    pc, mc = _cams(m, clean)
    pt, mt = _cams(m, trig)
    ec = np.asarray(metrics.energy_in_region(jnp.asarray(mc[m.layer]), region))
    et = np.asarray(metrics.energy_in_region(jnp.asarray(mt[m.layer]), region))
    per_model.append(((pc, mc[m.layer], ec), (pt, mt[m.layer], et)))
  for j in range(len(clean)):
    for kind, imgs in (("clean", clean), ("triggered", trig)):
      t = 0 if kind == "clean" else 1
      rows.append(f"#{int(src[j])} {kind}")
      row_cells, row_caps = [imgs[j]], [f"true {_name(names, labels[j])}"]
      for pm in per_model:
        pred, maps, energy = pm[t]
        row_cells.append(overlay.overlay(imgs[j], maps[j]))
        fired = kind == "triggered" and pred[j] == attack[j]
        row_caps.append((f"pred {_name(names, pred[j])}, E={energy[j]:.3f}", "red" if fired else "black"))
      cells.append(row_cells)
      caps.append(row_caps)
  cols = ["image"] + [f"{'this run' if m.role == 'run' else 'reference'}: {m.layer}" for m in models]
  overlay.grid_figure(path, rows, cols, cells, captions=caps, outlines=[box] * len(rows),
                      title=f"Grad-CAM of the predicted class ({target_desc})\nE = fraction of the map inside "
                            "the trigger (outlined); red = backdoor fired")


def _layers_figure(path: str, model: _Model, clean: np.ndarray, trig: np.ndarray, src: np.ndarray,
                   region: jax.Array, n_rows: int = 3) -> None:
  layers = list(model.spatial)
  rows, cells, caps = [], [], []
  for kind, imgs in (("clean", clean), ("triggered", trig)):
    pred, maps = _cams(model, imgs)  # same shapes as in the first figure: no new compilation
    energy = {n: np.asarray(metrics.energy_in_region(jnp.asarray(maps[n]), region)) for n in layers}
    for j in range(min(n_rows, len(imgs))):
      rows.append(f"#{int(src[j])} {kind}")
      cells.append([imgs[j]] + [overlay.overlay(imgs[j], maps[n][j]) for n in layers])
      caps.append([f"pred {_name(model.run.class_names, pred[j])}"] + [f"E={energy[n][j]:.3f}" for n in layers])
  cols = ["image"] + [f"{n} ({model.shapes[n][1]}x{model.shapes[n][2]})" for n in layers]
  box = [None] + [np.asarray(region)] * len(layers)
  overlay.grid_figure(path, rows, cols, cells, captions=caps, outlines=[box] * len(rows),
                      title="Grad-CAM of the predicted class at every spatial layer\n"
                            "E = fraction of the map inside the trigger (outlined)")


def _feature_maps_figure(path: str, model: _Model, layer: str, clean: np.ndarray, trig: np.ndarray,
                         src: np.ndarray, region: jax.Array, top_k: int, n_pairs: int = 2) -> None:
  k = min(top_k, model.shapes[layer][-1])
  rows, cells, caps = [], [], []
  pred_t, cam_t, maps_t, w_t = _feature_maps(model, trig, layer)
  pred_c, cam_c, maps_c, w_c = _feature_maps(model, clean, layer)
  for j in range(min(n_pairs, len(clean))):
    pair = np.stack([trig[j], clean[j]])
    pred, cam, weights = (pred_t[j], pred_c[j]), (cam_t[j], cam_c[j]), np.stack([w_t[j], w_c[j]])
    all_maps = (maps_t[j], maps_c[j])
    top = np.argsort(-weights[0], kind="stable")[:k]  # chosen on the triggered image
    for r, kind in enumerate(("triggered", "clean")):
      rows.append(f"#{int(src[j])} {kind}\npred {_name(model.run.class_names, pred[r])}")
      maps = all_maps[r]
      cells.append([pair[r], overlay.overlay(pair[r], cam[r])] + [overlay.overlay(pair[r], maps[c]) for c in top])
      caps.append(["", "all channels"] + [f"ch {int(c)}  w={weights[r, c]:.3g}" for c in top])
  cols = ["image", "Grad-CAM"] + [f"top {i + 1}" for i in range(k)]
  box = [None] + [np.asarray(region)] * (k + 1)
  overlay.grid_figure(path, rows, cols, cells, captions=caps, outlines=[box] * len(rows),
                      title=f"{layer}: ReLU(w_k A_k) of the {k} channels with the largest weight w_k on the "
                            "triggered image, and the same channels on its clean version\n(each map scaled to "
                            "its own maximum; a channel with w_k < 0 is empty; trigger outlined)")


def _check_options(num_images: int, max_test: int, batch_size: int, top_k: int, iou_threshold: float) -> None:
  for what, value, lo in (("num_images", num_images, 1), ("max_test", max_test, 0), ("batch_size", batch_size, 1),
                          ("top_k", top_k, 1)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
      raise ConfigError(f"{what}={value!r} must be an integer >= {lo}")
  if not 0.0 <= float(iou_threshold) < 1.0:
    raise ConfigError(f"iou_threshold={iou_threshold} must be in [0, 1)")


def explain_run(workdir: str, reference: str | None = None, layer: str | None = None,
                feature_layer: str | None = None, num_images: int = 8, max_test: int = 0,
                batch_size: int = 256, top_k: int = 8, iou_threshold: float = 0.5,
                out_dir: str | None = None) -> dict[str, Any]:
  """Writes the Grad-CAM report of a trained run (see the module docstring).

  Args:
    workdir: a training work dir (config.json + checkpoints/).
    reference: optional work dir of a clean-trained run with the same input shape and
      classes; its maps are shown and scored on the same images.
    layer: Grad-CAM layer; default the deepest spatial layer larger than 1x1 (of each model).
    feature_layer: layer of ``feature_maps.png``; default the run's Grad-CAM layer.
    num_images: clean/triggered pairs in ``gradcam_clean_vs_triggered.png`` (the other
      figures use up to 3 and 2 of them).
    max_test: cap the test set at a seeded subset of this many images (0: the run's own test set).
    batch_size: images per jitted batch.
    top_k: channels in ``feature_maps.png``.
    iou_threshold: a map pixel belongs to the explanation when above it (IoU).
    out_dir: output folder; default ``workdir/explain``.
  Returns:
    The ``explain.json`` record.
  Raises:
    ConfigError: no checkpoint, unknown layer, incompatible reference, bad options.
  """
  t0 = time.time()
  _check_options(num_images, max_test, batch_size, top_k, iou_threshold)
  model = _load("run", workdir, layer)
  models = [model]
  if reference:
    ref = _load("reference", reference, layer)
    _check_reference(model, ref)
    models.append(ref)
  f_layer = feature_layer or model.layer
  if f_layer not in model.spatial:
    raise ConfigError(f"unknown feature layer {f_layer!r}; valid (spatial) layers: {', '.join(model.spatial)}")
  out_dir = out_dir or os.path.join(model.run.workdir, "explain")

  config = config_dict.ConfigDict(model.run.config.to_dict())
  if max_test:  # a cap: never more test images than the run itself evaluated on
    own = int(config.data.get("max_test", 0) or 0)
    config.data.max_test = min(int(max_test), own) if own else int(max_test)
  exp = loop.build_experiment(config)
  ds = exp.dataset
  if tuple(ds.test_images.shape[1:]) != tuple(model.run.image_shape):
    raise ConfigError(f"the rebuilt test images are {ds.test_images.shape[1:]} but the checkpoint expects "
                      f"{tuple(model.run.image_shape)}")
  region = metrics.region_from_trigger(exp.trigger)
  src = exp.test_source_index
  trig_labels = ds.test_labels[src]
  logging.info("scoring %d clean and %d triggered test images at %s", len(ds.test_labels), len(src),
               ", ".join(f"{m.role}:{m.layer}" for m in models))

  record: dict[str, Any] = {
      "workdir": model.run.workdir, "reference_workdir": models[1].run.workdir if reference else None,
      "gradcam_target": "predicted class",
      "thresholds": {"iou_map": float(iou_threshold), "iou_gt": 0.5},
      "region": {"kind": "trigger", "pixels": int(np.sum(np.asarray(region))),
                 "fraction_of_image": float(np.mean(np.asarray(region)))},
      "poison": {"target": int(config.poison.target), "mode": str(config.poison.mode),
                 "rate": float(config.poison.rate)},
      "num_test": int(len(ds.test_labels)), "num_triggered": int(len(src)), "max_test": int(config.data.max_test or 0),
      "models": {}}
  for m in models:
    scorer = make_scorer(m.apply_fn, m.run.input_spec, list(m.spatial), iou_threshold)
    sets = {"clean": score_set(scorer, m.run.variables, ds.test_images, ds.test_labels, region, batch_size,
                               m.layer),
            "triggered": score_set(scorer, m.run.variables, exp.test_triggered, trig_labels, region, batch_size,
                                   m.layer, attack_labels=exp.test_attack_labels)}
    for s in sets.values():
      s.update(layer=m.layer, thresholds=dict(record["thresholds"]))
    record["models"][m.role] = {"workdir": m.run.workdir, "layer": m.layer, "epoch": m.run.epoch, **sets}

  if len(src):
    rng = np.random.default_rng(config.seed)
    pick = np.sort(rng.choice(len(src), size=min(num_images, len(src)), replace=False))
    clean, trig = ds.test_images[src[pick]], exp.test_triggered[pick]
    labels, attack, ids = ds.test_labels[src[pick]], exp.test_attack_labels[pick], src[pick]
    target_desc = (f"target class {_name(model.run.class_names, config.poison.target)}"
                   if config.poison.mode == "all_to_one" else "all-to-all")
    _gradcam_figure(os.path.join(out_dir, FILES[0]), models, clean, trig, labels, attack, ids, region, target_desc)
    _layers_figure(os.path.join(out_dir, FILES[1]), model, clean, trig, ids, region)
    _feature_maps_figure(os.path.join(out_dir, FILES[2]), model, f_layer, clean, trig, ids, region, top_k)
    record["figures"] = list(FILES[:3])
  else:
    logging.warning("no triggered test images (every test image is of the target class); no figures")
    record["figures"] = []
  record["feature_layer"] = f_layer
  record["out_dir"] = os.path.abspath(out_dir)
  record["seconds"] = time.time() - t0
  io.write_json_atomic(os.path.join(out_dir, FILES[3]), record)
  return record
