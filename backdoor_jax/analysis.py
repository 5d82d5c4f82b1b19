"""Explanation report of a trained run: where do its explanations look, with and without the trigger?

The analysis pipeline behind ``launch/explain.py`` (it lives outside ``explain/`` so
that the explanation library never imports the training code). :func:`explain_run`
loads a training work dir (``train.restore.load_run``), rebuilds its test data and
trigger (``experiment.build_experiment``) and writes into ``WORKDIR/explain/``, for any
registered explanation method (``explain.registry``; Grad-CAM by default):

* ``gradcam_clean_vs_triggered.png``: test images and their triggered versions, with
  the Grad-CAM of the run (and of a clean reference run) and each model's prediction;
* ``layers.png``: the run's maps at every spatial layer (methods that take a layer);
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

from backdoor_jax import experiment, io
from backdoor_jax.data import pipeline
from backdoor_jax.errors import ConfigError
from backdoor_jax.explain import layers as layers_lib
from backdoor_jax.explain import metrics, overlay, registry
from backdoor_jax.explain.gradcam import gradcam
from backdoor_jax.explain.methods import feature_map_cams
from backdoor_jax.train import restore, steps

FILES = ("gradcam_clean_vs_triggered.png", "layers.png", "feature_maps.png", "explain.json")


NO_LAYER = "-"  # the map key of methods that take no layer (SimpleGrad, VisualBackProp)


@dataclasses.dataclass
class _Model:
  """A loaded run plus the explanation method and layer chosen for it."""
  role: str                      # 'run' or 'reference'
  run: restore.TrainedRun
  method: registry.Method
  layer: str                     # NO_LAYER for methods that take none
  spatial: tuple[str, ...]       # spatial layers in forward order
  shapes: dict[str, tuple[int, ...]]
  jitted: dict[Any, Callable[..., Any]] = dataclasses.field(default_factory=dict)

  @property
  def apply_fn(self) -> Callable[..., Any]:
    return self.run.model.apply

  @property
  def map_keys(self) -> list[str]:
    """The maps scored and drawn: every spatial layer, or the one layer-free map."""
    return list(self.spatial) if self.method.takes_layer else [NO_LAYER]


def _load(role: str, workdir: str, layer: str | None, method: str) -> _Model:
  m = registry.get(method)
  run = restore.load_run(workdir)
  info = layers_lib.layer_info_for_shape(run.model.apply, run.variables, run.image_shape)
  what = f"the {role} model ({run.config.model.name})"
  if m.takes_layer:
    layer = layers_lib.choose_layer(info, layer, what=what)
  elif layer:
    raise ConfigError(f"explanation method {method!r} takes no layer; got layer={layer!r}")
  return _Model(role, run, m, layer or NO_LAYER, info.spatial, info.shapes)


def maps_fn(method: registry.Method, apply_fn: Callable[..., Any], keys: list[str]
            ) -> Callable[..., dict[str, jax.Array]]:
  """``f(variables, x, targets) -> {key: (B, H, W) maps}`` of ``method`` at ``keys`` (see ``_Model.map_keys``)."""
  def f(variables, x, targets):
    if not method.takes_layer:
      return {NO_LAYER: registry.explanation_maps(method.name, apply_fn, variables, x, targets, None)}
    return registry.maps_at_layers(method.name, apply_fn, variables, x, targets, keys)
  return f


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
                iou_threshold: float, method: str = "gradcam") -> Callable[..., dict[str, Any]]:
  """A jitted ``score(variables, images_uint8, region) -> per-image dict``.

  The maps of ``method`` for the predicted class at every layer of ``layers`` (for
  Grad-CAM one forward and one backward pass give them all; ``[NO_LAYER]`` for a
  method that takes no layer). The dict holds ``pred`` (B,) and, per layer,
  ``energy`` (B,) fraction of the map inside the region, ``pointing`` (B,) bool and
  ``iou`` (B,) of ``maps > iou_threshold`` with the region.
  """
  get_maps = maps_fn(registry.get(method), apply_fn, list(layers))

  def score(variables, images, region):
    chex.assert_rank(images, 4)
    x = steps.preprocess(None, images, spec)
    pred = jnp.argmax(apply_fn(variables, x, train=False), -1)
    all_maps = get_maps(variables, x, pred)
    per_layer = {}
    for name in layers:
      maps = all_maps[name]
      per_layer[name] = {"energy": metrics.energy_in_region(maps, region),
                         "pointing": metrics.pointing_game(maps, region),
                         "iou": metrics.iou(maps, region, threshold=iou_threshold)}
    return {"pred": pred, "layers": per_layer}
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
  """Predictions and normalised maps of a few uint8 images at every key of ``model.map_keys`` (jitted)."""
  key = "cams"
  if key not in model.jitted:
    spec, apply_fn = model.run.input_spec, model.apply_fn
    get_maps = maps_fn(model.method, apply_fn, model.map_keys)

    def cams(variables, images):
      x = steps.preprocess(None, images, spec)
      pred = jnp.argmax(apply_fn(variables, x, train=False), -1)
      return pred, get_maps(variables, x, pred)
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


def _title(model: _Model) -> str:
  return "Grad-CAM" if model.method.name == "gradcam" else model.method.name


def _label(model: _Model) -> str:
  return model.layer if model.method.takes_layer else model.method.name


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
  cols = ["image"] + [f"{'this run' if m.role == 'run' else 'reference'}: {_label(m)}" for m in models]
  overlay.grid_figure(path, rows, cols, cells, captions=caps, outlines=[box] * len(rows),
                      title=f"{_title(models[0])} of the predicted class ({target_desc})\nE = fraction of the map inside "
                            "the trigger (outlined); red = backdoor fired")


def _layers_figure(path: str, model: _Model, clean: np.ndarray, trig: np.ndarray, src: np.ndarray,
                   region: jax.Array, n_rows: int = 3) -> None:
  layers = model.map_keys
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
                      title=f"{_title(model)} of the predicted class at every spatial layer\n"
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
                out_dir: str | None = None, method: str = "gradcam") -> dict[str, Any]:
  """Writes the explanation report of a trained run (see the module docstring).

  Args:
    workdir: a training work dir (config.json + checkpoints/).
    reference: optional work dir of a clean-trained run with the same input shape and
      classes; its maps are shown and scored on the same images.
    layer: the explained layer (methods that take one); default ``explain.layers.default_layer``:
      the deepest spatial layer whose map is at least 4x4 (of each model), as in training.
    feature_layer: layer of ``feature_maps.png`` (per-channel Grad-CAM); default the
      explained layer, or the default layer for methods that take none.
    num_images: clean/triggered pairs in ``gradcam_clean_vs_triggered.png`` (the other
      figures use up to 3 and 2 of them).
    max_test: cap the test set at a seeded subset of this many images (0: the run's own test set).
    batch_size: images per jitted batch.
    top_k: channels in ``feature_maps.png``.
    iou_threshold: a map pixel belongs to the explanation when above it (IoU).
    out_dir: output folder; default ``workdir/explain``.
    method: a registered explanation method (``explain.registry.NAMES``).
  Returns:
    The ``explain.json`` record.
  Raises:
    ConfigError: no checkpoint, unknown method or layer, incompatible reference, bad options.
  """
  t0 = time.time()
  _check_options(num_images, max_test, batch_size, top_k, iou_threshold)
  model = _load("run", workdir, layer, method)
  models = [model]
  if reference:
    ref = _load("reference", reference, layer, method)
    _check_reference(model, ref)
    models.append(ref)
  f_layer = feature_layer or (model.layer if model.method.takes_layer else layers_lib.default_layer(
      layers_lib.LayerInfo(model.spatial, model.shapes, model.run.num_classes)))
  if f_layer not in model.spatial:
    raise ConfigError(f"unknown feature layer {f_layer!r}; valid (spatial) layers: {', '.join(model.spatial)}")
  out_dir = out_dir or os.path.join(model.run.workdir, "explain")

  config = config_dict.ConfigDict(model.run.config.to_dict())
  if max_test:  # a cap: never more test images than the run itself evaluated on
    own = int(config.data.get("max_test", 0) or 0)
    config.data.max_test = min(int(max_test), own) if own else int(max_test)
  exp = experiment.build_experiment(config)
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
      "method": method, "gradcam_target": "predicted class",
      "thresholds": {"iou_map": float(iou_threshold), "iou_gt": 0.5},
      "region": {"kind": "trigger", "pixels": int(np.sum(np.asarray(region))),
                 "fraction_of_image": float(np.mean(np.asarray(region)))},
      "poison": {"target": int(config.poison.target), "mode": str(config.poison.mode),
                 "rate": float(config.poison.rate)},
      "num_test": int(len(ds.test_labels)), "num_triggered": int(len(src)), "max_test": int(config.data.max_test or 0),
      "models": {}}
  for m in models:
    scorer = make_scorer(m.apply_fn, m.run.input_spec, m.map_keys, iou_threshold, method)
    sets = {"clean": score_set(scorer, m.run.variables, ds.test_images, ds.test_labels, region, batch_size,
                               m.layer),
            "triggered": score_set(scorer, m.run.variables, exp.test_triggered, trig_labels, region, batch_size,
                                   m.layer, attack_labels=exp.test_attack_labels)}
    layer_or_none = m.layer if m.method.takes_layer else None
    for s in sets.values():
      s.update(layer=layer_or_none, thresholds=dict(record["thresholds"]))
      s["by_layer"].pop(NO_LAYER, None)
    record["models"][m.role] = {"workdir": m.run.workdir, "layer": layer_or_none, "epoch": m.run.epoch, **sets}

  if len(src):
    rng = np.random.default_rng(config.seed)
    pick = np.sort(rng.choice(len(src), size=min(num_images, len(src)), replace=False))
    clean, trig = ds.test_images[src[pick]], exp.test_triggered[pick]
    labels, attack, ids = ds.test_labels[src[pick]], exp.test_attack_labels[pick], src[pick]
    target_desc = (f"target class {_name(model.run.class_names, config.poison.target)}"
                   if config.poison.mode == "all_to_one" else "all-to-all")
    _gradcam_figure(os.path.join(out_dir, FILES[0]), models, clean, trig, labels, attack, ids, region, target_desc)
    record["figures"] = [FILES[0]]
    if model.method.takes_layer:
      _layers_figure(os.path.join(out_dir, FILES[1]), model, clean, trig, ids, region)
      record["figures"].append(FILES[1])
    _feature_maps_figure(os.path.join(out_dir, FILES[2]), model, f_layer, clean, trig, ids, region, top_k)
    record["figures"].append(FILES[2])
  else:
    logging.warning("no triggered test images (every test image is of the target class); no figures")
    record["figures"] = []
  record["feature_layer"] = f_layer
  record["out_dir"] = os.path.abspath(out_dir)
  record["seconds"] = time.time() - t0
  io.write_json_atomic(os.path.join(out_dir, FILES[3]), record)
  return record
