"""Faithfulness and sanity report of trained runs: are their maps faithful to the model?

:func:`evaluate_faithfulness` computes every metric of ``explain.faithfulness`` for one
model on one image set, from the pieces of a restored run (``apply_fn``, variables, a
preprocessing callable, images, labels, a maps function), batch by batch with fixed
shapes (one compilation per metric), and returns a JSON-ready record: mean curves and
per-image summary statistics. :func:`write_faithfulness_report` writes such records
(models x image sets) as ``faithfulness.json`` and ``faithfulness_curves.png``.
:func:`faithfulness_run` does both for a training work dir (and a clean reference run)
on its clean and triggered test images, with Grad-CAM of the predicted class.

Every curve tracks the *predicted* class (the class the map explains). Perturbations
happen on the normalised model inputs, so the ``zeros`` baseline is the training-set
mean colour.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ml_collections import config_dict

from backdoor_jax import figures, io, models
from backdoor_jax.data import pipeline
from backdoor_jax.errors import ConfigError
from backdoor_jax.experiment import build_experiment
from backdoor_jax.explain import faithfulness as F
from backdoor_jax.explain import sanity as S
from backdoor_jax.explain import layers as layer_lib
from backdoor_jax.explain.gradcam import gradcam_maps
from backdoor_jax.train import restore, steps

FILES = ("faithfulness.json", "faithfulness_curves.png")


@dataclasses.dataclass(frozen=True)
class FaithfulnessSettings:
  """What :func:`evaluate_faithfulness` computes (defaults: RISE / ROAD papers' choices)."""
  n_steps: int = 32                      # deletion / insertion chunks
  deletion_baseline: str = "zeros"
  insertion_baseline: str = "blur"
  blur_sigma: float = 5.0
  score: str = "probability"             # or 'logit'
  road_fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
  road_noise: float = 0.01
  patch_size: int = 4                    # region perturbation
  n_regions: int = 16
  similarity: tuple[str, ...] = ("spearman", "ssim", "pearson")
  randomization: bool = True
  random_logit: bool = True
  batch_size: int = 100
  seed: int = 0


def _stats(x: np.ndarray) -> dict[str, float]:
  return {"mean": float(np.mean(x)), "std": float(np.std(x)), "median": float(np.median(x))}


def _curve_record(fractions: np.ndarray, scores: np.ndarray, summary: np.ndarray, name: str) -> dict[str, Any]:
  return {"fractions": [float(f) for f in fractions], "mean_curve": [float(v) for v in scores.mean(0)],
          name: _stats(summary)}


def evaluate_faithfulness(apply_fn: Callable[[Any, jax.Array], jax.Array], variables: Any,
                          preprocess: Callable[[jax.Array], jax.Array], images: np.ndarray, labels: np.ndarray,
                          maps_fn: F.MapsFn, *, settings: FaithfulnessSettings = FaithfulnessSettings(),
                          random_variables: Any | None = None, layers: list[str] | None = None) -> dict[str, Any]:
  """All faithfulness metrics of one model on one image set.

  Args:
    apply_fn: ``apply_fn(variables, x) -> logits`` on model inputs (e.g.
      ``functools.partial(model.apply, train=False)``; keep one object so jit caches hold).
    variables: the model's variables.
    preprocess: raw images (e.g. uint8) -> (B, H, W, C) float model inputs.
    images: (N, H, W, C) raw images; labels: (N,) true classes (for the accuracy only).
    maps_fn: ``maps_fn(variables, x, targets) -> (B, H, W)`` explanation maps of model inputs.
    settings: see :class:`FaithfulnessSettings`.
    random_variables: a fresh initialisation of the model for the randomisation test
      (default: Gaussian re-draws, see ``faithfulness.randomize_layers``).
    layers: parameter names from the output layer down (randomisation order).
  Returns:
    JSON-ready dict: ``count``, ``accuracy``; ``deletion`` / ``insertion`` (``auc``
    stats, mean curve), ``road_morf`` / ``road_lerf`` (``mean`` over the fractions),
    ``road_combined`` (mean (LeRF - MoRF) / 2, pytorch-grad-cam's ROADCombined),
    ``region_perturbation`` (``aopc``), ``randomization`` (per-step mean similarity),
    ``random_logit`` (mean similarity).
  Raises:
    ConfigError: an empty set, bad settings.
  """
  s = settings
  n = int(len(labels))
  if n == 0:
    raise ConfigError("faithfulness needs at least one image; the set is empty")
  key = jax.random.key(s.seed)
  logits = jax.jit(apply_fn)
  maps_j = jax.jit(maps_fn)
  parts: dict[str, list[np.ndarray]] = {}
  curves: dict[str, np.ndarray] = {}

  def add(name, value, valid):
    parts.setdefault(name, []).append(np.asarray(value)[valid])

  for i, (idx, valid) in enumerate(pipeline.eval_batches(n, min(s.batch_size, n))):
    x = preprocess(jnp.asarray(images[idx]))
    pred = jnp.argmax(logits(variables, x), -1)
    maps = maps_j(variables, x, pred)
    add("correct", pred == jnp.asarray(labels[idx]), valid)
    common = dict(score=s.score, variables=variables)
    runs = {
        "deletion": F.deletion(apply_fn, x, maps, pred, n_steps=s.n_steps, baseline=s.deletion_baseline,
                               blur_sigma=s.blur_sigma, **common),
        "insertion": F.insertion(apply_fn, x, maps, pred, n_steps=s.n_steps, baseline=s.insertion_baseline,
                                 blur_sigma=s.blur_sigma, **common),
        "road_morf": F.road(apply_fn, x, maps, pred, fractions=s.road_fractions, order="morf", noise=s.road_noise,
                            key=jax.random.fold_in(key, 2 * i), **common),
        "road_lerf": F.road(apply_fn, x, maps, pred, fractions=s.road_fractions, order="lerf", noise=s.road_noise,
                            key=jax.random.fold_in(key, 2 * i + 1), **common),
        "region_perturbation": F.region_perturbation(apply_fn, x, maps, pred, patch_size=s.patch_size,
                                                     n_regions=s.n_regions, baseline=s.deletion_baseline,
                                                     blur_sigma=s.blur_sigma, **common)}
    for name, c in runs.items():
      add(name, c.scores, valid)
      add(name + "_auc", c.auc, valid)
      curves[name] = np.asarray(c.fractions)
    add("region_perturbation_aopc", F.aopc(runs["region_perturbation"]), valid)
    if s.randomization:
      r = S.randomization_test(maps_fn, variables, x, pred, layers=layers, key=jax.random.fold_in(key, 10_000 + i),
                               random_variables=random_variables, similarity=s.similarity)
      rand_labels = list(r.labels)
      for name, v in r.similarity.items():
        add("randomization_" + name, np.asarray(v).T, valid)  # (B, L + 1)
    if s.random_logit:
      num_classes = int(jax.eval_shape(lambda v, a: apply_fn(v, a), variables, x).shape[-1])
      rl = S.random_logit_test(maps_fn, variables, x, pred, num_classes, jax.random.fold_in(key, 20_000 + i),
                               similarity=s.similarity)
      for name, v in rl.similarity.items():
        add("random_logit_" + name, v, valid)
  cat = {k: np.concatenate(v) for k, v in parts.items()}
  rec: dict[str, Any] = {"count": n, "accuracy": float(np.mean(cat["correct"])), "target": "predicted class",
                         "settings": dataclasses.asdict(s)}
  for name in ("deletion", "insertion"):
    rec[name] = _curve_record(curves[name], cat[name], cat[name + "_auc"], "auc")
  for name in ("road_morf", "road_lerf"):
    rec[name] = _curve_record(curves[name], cat[name], cat[name].mean(-1), "mean")
  rec["road_combined"] = _stats((cat["road_lerf"] - cat["road_morf"]).mean(-1) / 2)
  rec["region_perturbation"] = _curve_record(curves["region_perturbation"], cat["region_perturbation"],
                                             cat["region_perturbation_aopc"], "aopc")
  if s.randomization:
    rec["randomization"] = {"layers": rand_labels, "cascade": True,
                            **{m: [float(v) for v in cat["randomization_" + m].mean(0)] for m in s.similarity}}
  if s.random_logit:
    rec["random_logit"] = {m: _stats(cat["random_logit_" + m]) for m in s.similarity}
  return rec


def write_faithfulness_report(out_dir: str, records: dict[str, dict[str, dict[str, Any]]],
                              extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes ``faithfulness.json`` and ``faithfulness_curves.png`` for ``records[model][image_set]``.

  Returns:
    The JSON record (``models``: the records, plus ``extra``).
  """
  import matplotlib.pyplot as plt
  panels = (("deletion", "deletion (lower = faithful)", "fraction of pixels removed"),
            ("insertion", "insertion (higher = faithful)", "fraction of pixels inserted"),
            ("road_morf", "ROAD MoRF (solid) / LeRF (dashed)", "fraction of pixels imputed"),
            ("region_perturbation", "region perturbation", "fraction of pixels perturbed"),
            ("randomization", "cascading randomisation (Spearman)", "layers randomised (top down)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
  for (key, title, xlabel), ax in zip(panels, axes):
    for model, sets in records.items():
      for set_name, rec in sets.items():
        label = f"{model} / {set_name}"
        if key == "randomization":
          if key in rec and "spearman" in rec[key]:
            ax.plot(range(len(rec[key]["spearman"])), rec[key]["spearman"], marker="o", label=label)
            ax.set_xticks(range(len(rec[key]["layers"])), rec[key]["layers"], rotation=60, fontsize=7)
          continue
        line, = ax.plot(rec[key]["fractions"], rec[key]["mean_curve"], label=label)
        if key == "road_morf":
          ax.plot(rec["road_lerf"]["fractions"], rec["road_lerf"]["mean_curve"], ls="--", color=line.get_color())
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("score of the predicted class")
  axes[0].legend(fontsize=7)
  figures.save_figure(fig, os.path.join(out_dir, FILES[1]))
  out = {"models": records, **(extra or {}), "figures": [FILES[1]]}
  io.write_json_atomic(os.path.join(out_dir, FILES[0]), out)
  return out


def faithfulness_run(workdir: str, reference: str | None = None, layer: str | None = None, max_test: int = 200,
                     out_dir: str | None = None, settings: FaithfulnessSettings = FaithfulnessSettings()
                     ) -> dict[str, Any]:
  """Faithfulness of a run's (and a reference run's) Grad-CAM on clean and triggered test images.

  Args:
    workdir: training work dir (``config.json`` + checkpoints).
    reference: optional work dir of a clean run on the same data (e.g. a two-stage run's ``stage1``).
    layer: Grad-CAM layer; default the layer the run's explanation attack used
      (``results.json`` ``layer``), else the default-layer rule of ``explain.layers``.
    max_test: a seeded subset of at most this many test images per set (0 = all).
    out_dir: default ``workdir/explain``.
    settings: metric settings.
  Returns:
    The ``faithfulness.json`` record (``models[role][set]`` with role ``run`` / ``reference``
    and set ``clean`` / ``triggered``).
  Raises:
    ConfigError: no checkpoint, unknown layer, incompatible reference, bad settings.
  """
  t0 = time.time()
  if not isinstance(max_test, int) or max_test < 0:
    raise ConfigError(f"max_test={max_test!r} must be an integer >= 0")
  runs = {"run": restore.load_run(workdir)}
  if reference:
    runs["reference"] = restore.load_run(reference)
    if tuple(runs["reference"].image_shape) != tuple(runs["run"].image_shape):
      raise ConfigError(f"reference run {reference} takes {tuple(runs['reference'].image_shape)} inputs but the run "
                        f"takes {tuple(runs['run'].image_shape)}; use a reference trained on the same data")
  main = runs["run"]
  if not layer:
    res_path = os.path.join(main.workdir, "results.json")
    layer = io.read_json(res_path).get("layer") if os.path.exists(res_path) else None
  config = config_dict.ConfigDict(main.config.to_dict())
  exp = build_experiment(config)
  rng = np.random.default_rng(int(config.seed))
  pick = lambda m: np.sort(rng.choice(m, size=min(max_test, m), replace=False)) if max_test else np.arange(m)
  ci, ti = pick(len(exp.dataset.test_labels)), pick(len(exp.test_source_index))
  sets = {"clean": (exp.dataset.test_images[ci], exp.dataset.test_labels[ci]),
          "triggered": (exp.test_triggered[ti], exp.dataset.test_labels[exp.test_source_index[ti]])}
  records: dict[str, dict[str, Any]] = {}
  chosen = {}
  for role, run in runs.items():
    info = layer_lib.layer_info_for_shape(run.model.apply, run.variables, run.image_shape)
    name = layer_lib.choose_layer(info, layer)
    chosen[role] = name
    apply_fn = functools.partial(run.model.apply, train=False)
    maps_fn = functools.partial(_gradcam_of, run.model.apply, layer=name)
    spec = run.input_spec
    preprocess = functools.partial(steps.preprocess, None, spec=spec)
    fresh = models.init_variables(run.model, jax.random.key(int(config.seed) + 1), (1,) + tuple(run.image_shape))
    order = list(reversed(list(fresh["params"])))  # a fresh init lists modules in call order
    records[role] = {s: evaluate_faithfulness(apply_fn, run.variables, preprocess, imgs, labels, maps_fn,
                                              settings=settings, random_variables=fresh, layers=order)
                     for s, (imgs, labels) in sets.items() if len(labels)}  # no triggered set: all of the target class
    for s in records[role].values():
      s["layer"] = name
  out_dir = out_dir or os.path.join(main.workdir, "explain")
  extra = {"workdir": main.workdir, "reference_workdir": runs["reference"].workdir if reference else None,
           "layers": chosen, "explanation": "Grad-CAM of the predicted class", "seconds": time.time() - t0}
  rec = write_faithfulness_report(out_dir, records, extra)
  rec["out_dir"] = os.path.abspath(out_dir)
  return rec


def _gradcam_of(apply_fn, variables, x, targets, layer):
  """``maps_fn`` form of Grad-CAM: normalised input-size maps of ``targets`` at ``layer``."""
  return gradcam_maps(apply_fn, variables, x, targets, layer)


def summary_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per model and image set with the headline numbers of a ``faithfulness.json`` record."""
  rows = []
  for role, sets in record["models"].items():
    for set_name, r in sets.items():
      row = {"model": role, "images": set_name, "n": r["count"], "accuracy": r["accuracy"],
             "deletion_auc": r["deletion"]["auc"]["mean"], "insertion_auc": r["insertion"]["auc"]["mean"],
             "road_morf": r["road_morf"]["mean"]["mean"], "road_lerf": r["road_lerf"]["mean"]["mean"],
             "road_combined": r["road_combined"]["mean"], "aopc": r["region_perturbation"]["aopc"]["mean"]}
      if "randomization" in r:
        row["rand_spearman_last"] = r["randomization"]["spearman"][1]
        row["rand_spearman_all"] = r["randomization"]["spearman"][-1]
      if "random_logit" in r:
        row["random_logit_spearman"] = r["random_logit"]["spearman"]["mean"]
      rows.append(row)
  return rows
