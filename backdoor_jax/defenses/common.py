"""What every defense shares: the defended run, its data, a clean validation split, model calls.

:func:`load_context` rebuilds a trained run (``train.restore.load_run``) and its data
(``experiment.build_experiment``: the same poisoned training set and the same poisoned
indices, from the config seed). Defenses that need clean data use a seeded validation
split carved from the *clean* training images (what a defender holding a little clean
data has); the test set is only used for the final clean accuracy / ASR / FSR.

Model calls take pixel-unit images (uint8, or float in [0, 255] after an input
transform such as denoising) and normalise them like training did. Fine-Pruning masks
channels of a named layer by putting a ``prune_mask`` entry into the variables dict
(see :func:`masked_apply`), so every jitted helper here works on pruned models unchanged.
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
from ml_collections import config_dict

from backdoor_jax import io, triggers
from backdoor_jax.data import pipeline
from backdoor_jax.errors import ConfigError
from backdoor_jax.explain import metrics as map_metrics
from backdoor_jax.explain import saliency
from backdoor_jax.explain import layers as layers_lib
from backdoor_jax.models.common import INTERMEDIATES, PERTURBATIONS
from backdoor_jax import experiment
from backdoor_jax.train import restore, steps

PRUNE_KEY = "prune_mask"


@dataclasses.dataclass
class ExplanationAttack:
  """How an explanation-backdoor run scores its maps (from its config and results.json)."""
  method: str
  layer: str
  region: np.ndarray          # (H, W) target region of the attack
  iou_threshold: float
  iou_gt: float


@dataclasses.dataclass
class DefenseContext:
  """A trained run with its data, ready to be defended."""
  run: restore.TrainedRun
  exp: experiment.Experiment
  config: config_dict.ConfigDict   # the defenses config
  seed: int
  val_index: np.ndarray            # indices into the training set (clean versions are used)
  layers: tuple[str, ...]          # exposed layers in forward order
  shapes: dict[str, tuple[int, ...]]
  explanation: ExplanationAttack | None
  test_images: np.ndarray          # clean test images (capped by config.max_test)
  test_labels: np.ndarray
  attack_images: np.ndarray        # triggered test images used for ASR / FSR
  attack_labels: np.ndarray        # attack labels (classic) or true labels (explanation run)
  attack_true_labels: np.ndarray | None = None  # classic runs: true labels of the triggered images (robust accuracy)
  _jitted: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)

  @property
  def apply_fn(self) -> Callable[..., Any]:
    return masked_apply(self.run.model.apply)

  @property
  def variables(self) -> dict[str, Any]:
    return self.run.variables

  @property
  def num_classes(self) -> int:
    return self.run.num_classes

  @property
  def is_explanation_run(self) -> bool:
    return self.explanation is not None

  @property
  def target(self) -> int | None:
    """The attack's target class (all-to-one and clean-label classic backdoors), else None."""
    c = self.run.config
    if self.is_explanation_run or c.poison.mode not in ("all_to_one", "clean_label") or not float(c.poison.rate):
      return None
    return int(c.poison.target)

  @property
  def val_images(self) -> np.ndarray:
    return self.exp.dataset.train_images[self.val_index]

  @property
  def val_labels(self) -> np.ndarray:
    return self.exp.dataset.train_labels[self.val_index]

  def jitted(self, name: str, make: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
    """One jitted function per name, built on first use."""
    if name not in self._jitted:
      self._jitted[name] = make()
    return self._jitted[name]


def masked_apply(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps ``model.apply`` so that ``variables['prune_mask'] = {layer: (K,) mask}`` zeroes channels.

  A first inference pass reads the activation A at ``layer``; the second adds the
  perturbation ``-A * (1 - mask)`` there, so the layer outputs ``A * mask`` and the
  rest of the network (and any gradient, Grad-CAM included) sees the pruned layer.
  Without ``prune_mask`` it is ``apply_fn`` itself.
  """
  def apply(variables, x, train=False, mutable=False, **kw):
    if PRUNE_KEY not in variables:
      return apply_fn(variables, x, train=train, mutable=mutable, **kw)
    (layer, mask), = variables[PRUNE_KEY].items()
    rest = {k: v for k, v in variables.items() if k != PRUNE_KEY}
    _, state = apply_fn(rest, x, train=False, mutable=[INTERMEDIATES])
    a = state[INTERMEDIATES][layer][0]
    pert = dict(rest.get(PERTURBATIONS, {}))
    pert[layer] = pert.get(layer, 0.0) - a * (1.0 - mask.astype(a.dtype))
    return apply_fn({**rest, PERTURBATIONS: pert}, x, train=train, mutable=mutable, **kw)
  return apply


def with_prune_mask(variables: dict[str, Any], layer: str, mask: Any) -> dict[str, Any]:
  """``variables`` with channels of ``layer`` masked (1 keeps a channel, 0 prunes it)."""
  return {**{k: v for k, v in variables.items() if k != PRUNE_KEY}, PRUNE_KEY: {layer: jnp.asarray(mask, jnp.float32)}}


def validation_split(n_train: int, *, fraction: float, size: int, seed: int) -> np.ndarray:
  """Seeded indices of the clean validation split carved from the training set.

  Raises:
    ConfigError: a split that is empty or not smaller than the training set.
  """
  n = int(size) if size else int(round(float(fraction) * n_train))
  if size and size < 0:
    raise ConfigError(f"val_size={size} is invalid; allowed: 0 (use val_fraction) or an int in [2, {n_train - 1}]")
  if not size and not 0 < float(fraction) < 1:
    raise ConfigError(f"val_fraction={fraction} is invalid; allowed: a fraction in (0, 1) of the "
                      f"{n_train} training samples")
  if not 2 <= n < n_train:
    raise ConfigError(f"validation split of {n} samples does not fit the {n_train} training samples; "
                      f"allowed: 2 to {n_train - 1} (set val_fraction or val_size)")
  perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(seed), 7919), n_train))
  return np.sort(perm[:n]).astype(np.int64)


def _explanation_attack(run: restore.TrainedRun) -> ExplanationAttack | None:
  c = run.config
  if c.get("recipe", "badnets") == "badnets" or "explain" not in c:
    return None
  from backdoor_jax.train import explain_setup
  e = c.explain
  res_path = os.path.join(run.workdir, "results.json")
  layer = io.read_json(res_path).get("layer") if os.path.exists(res_path) else None
  if not layer:
    info = layers_lib.layer_info_for_shape(run.model.apply, run.variables, run.image_shape)
    layer = layers_lib.choose_layer(info, e.layer, what="explain.layer")
  methods = list(e.joint_weights.keys()) if e.get("joint_weights") else [e.method]
  if e.criterion != "iou":
    raise ConfigError(f"explanation run {run.workdir} uses explain.criterion={e.criterion!r}; the defenses "
                      "score FSR with criterion 'iou' only")
  return ExplanationAttack(methods[0], layer, explain_setup.target_region(e, tuple(run.image_shape[:2])),
                           float(e.iou_threshold), float(e.iou_gt))


def _seeded_subset(n: int, limit: int, seed: int) -> np.ndarray:
  if not limit or limit >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, size=int(limit), replace=False))


def load_context(workdir: str, config: config_dict.ConfigDict) -> DefenseContext:
  """Loads a trained run and rebuilds its (poisoned) data; validates the shared settings.

  Raises:
    ConfigError: no run / checkpoint, or an invalid validation split.
  """
  run = restore.load_run(workdir)
  exp = experiment.build_experiment(run.config)
  if int(config.batch_size) < 1:
    raise ConfigError(f"batch_size={config.batch_size} is invalid; allowed: an int >= 1")
  seed = int(run.config.seed) if int(config.seed) < 0 else int(config.seed)
  val = validation_split(len(exp.train_labels), fraction=config.val_fraction, size=config.val_size, seed=seed)
  info = layers_lib.layer_info_for_shape(run.model.apply, run.variables, run.image_shape)
  expl = _explanation_attack(run)
  pick = _seeded_subset(len(exp.dataset.test_labels), int(config.max_test), seed)
  test_x, test_y = exp.dataset.test_images[pick], exp.dataset.test_labels[pick]
  if expl is None:
    keep = np.isin(exp.test_source_index, pick)
    att_x, att_y = exp.test_triggered[keep], exp.test_attack_labels[keep]
    att_true = exp.dataset.test_labels[exp.test_source_index[keep]]
  else:  # every test image with the trigger, judged by its true label (the prediction should not move)
    att_x, att_y, att_true = apply_trigger_chunked(exp.trigger, test_x), test_y, None
  return DefenseContext(run, exp, config, seed, val, tuple(info.order), dict(info.shapes), expl, test_x, test_y,
                        att_x, att_y, att_true)


def apply_trigger_chunked(trigger: Any, images: np.ndarray, chunk: int = 512) -> np.ndarray:
  """Triggered copies of ``images`` (uint8), in fixed-size jitted chunks."""
  f = jax.jit(triggers.apply_trigger)
  out = np.empty_like(images)
  for s in range(0, len(images), chunk):
    part = images[s:s + chunk]
    k = len(part)
    if k < chunk and s:
      part = np.concatenate([part, np.zeros((chunk - k,) + part.shape[1:], part.dtype)])
    out[s:s + k] = np.asarray(f(trigger, jnp.asarray(part)))[:k].astype(images.dtype)
  return out


def layer_info(ctx: DefenseContext) -> layers_lib.LayerInfo:
  """The defended model's exposed layers (forward order) as the explanation code's ``LayerInfo``."""
  return layers_lib.LayerInfo(tuple(ctx.layers), dict(ctx.shapes), int(ctx.run.num_classes))


def spatial_layer(ctx: DefenseContext, requested: str, what: str) -> str:
  """``requested`` or the deepest exposed (B, h, w, K) layer, of any size.

  The explanation code's default-layer rule (``layers.default_layer``) with
  ``min_size=1``: pruning and feature statistics need no spatial resolution.

  Raises:
    ConfigError: the model exposes no spatial layer, or ``requested`` is not one.
  """
  return layers_lib.choose_layer(layer_info(ctx), requested, min_size=1, what=what)


def feature_layer(ctx: DefenseContext, requested: str, what: str) -> str:
  """``requested`` or the last exposed layer (the (B, D) feature before the classifier)."""
  name = requested or ctx.layers[-1]
  if name not in ctx.shapes:
    raise ConfigError(f"{what} layer {name!r} does not exist in {ctx.run.config.model.name!r}; allowed: "
                      f"{', '.join(ctx.layers)}")
  return name


def _batches(n: int, batch_size: int):
  for idx, valid in pipeline.eval_batches(n, batch_size):
    yield idx, valid


def map_batches(fn: Callable[..., Any], images: np.ndarray, batch_size: int, *args: Any) -> Any:
  """Calls jitted ``fn(*args, images_batch)`` over fixed-size padded batches; concatenates outputs."""
  outs = []
  if len(images) == 0:
    return None
  for idx, valid in _batches(len(images), batch_size):
    out = jax.device_get(fn(*args, jnp.asarray(images[idx])))
    outs.append(jax.tree_util.tree_map(lambda a, v=valid: np.asarray(a)[v], out))
  return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs)


def logits(ctx: DefenseContext, variables: Any, images: np.ndarray,
           transform: Callable[[jax.Array], jax.Array] | None = None, name: str = "logits") -> np.ndarray:
  """(N, C) logits of pixel-unit ``images`` (after ``transform``, a jittable pixel -> pixel map)."""
  apply, spec = ctx.apply_fn, ctx.run.input_spec

  def make():
    def f(v, x):
      x = x.astype(jnp.float32)
      if transform is not None:
        x = transform(x)
      return apply(v, steps.preprocess(None, x, spec), train=False)
    return jax.jit(f)
  return map_batches(ctx.jitted(name, make), images, int(ctx.config.batch_size), variables)


def features(ctx: DefenseContext, variables: Any, images: np.ndarray, layer: str) -> np.ndarray:
  """Activations of ``layer`` for pixel-unit ``images``, as float32 numpy."""
  apply, spec = ctx.apply_fn, ctx.run.input_spec

  def make():
    def f(v, x):
      _, st = apply(v, steps.preprocess(None, x, spec), train=False, mutable=[INTERMEDIATES])
      return st[INTERMEDIATES][layer][0]
    return jax.jit(f)
  return map_batches(ctx.jitted(f"features/{layer}", make), images, int(ctx.config.batch_size), variables)


def training_set_features(ctx: DefenseContext, layer: str) -> np.ndarray:
  """``(N, D)`` flattened ``layer`` activations of the whole (poisoned) training set.

  Activation Clustering and Spectral Signatures both start from these.
  """
  feats = features(ctx, ctx.variables, ctx.exp.train_images, layer)
  return feats.reshape(len(feats), -1)


def accuracy(pred_logits: np.ndarray, labels: np.ndarray) -> float | None:
  if pred_logits is None or not len(labels):
    return None
  return float(np.mean(np.argmax(pred_logits, -1) == labels))


def fooled(ctx: DefenseContext, variables: Any, images: np.ndarray,
           transform: Callable[[jax.Array], jax.Array] | None = None, name: str = "fooled") -> np.ndarray | None:
  """Per image: does its explanation (of the predicted class) land on the attack's target region?"""
  e = ctx.explanation
  if e is None:
    return None
  apply, spec = ctx.apply_fn, ctx.run.input_spec
  region = jnp.asarray(e.region > 0)

  def make():
    def f(v, x):
      x = x.astype(jnp.float32)
      if transform is not None:
        x = transform(x)
      x = steps.preprocess(None, x, spec)
      pred = jnp.argmax(apply(v, x, train=False), -1)
      maps = saliency.explanation_maps(e.method, apply, v, x, pred, e.layer)
      return map_metrics.iou(maps, region, threshold=e.iou_threshold) > e.iou_gt
    return jax.jit(f)
  return map_batches(ctx.jitted(name, make), images, int(ctx.config.batch_size), variables)


def evaluate(ctx: DefenseContext, variables: Any, transform: Callable[[jax.Array], jax.Array] | None = None,
             name: str = "") -> dict[str, Any]:
  """Test-set report of a (defended) model: clean accuracy, ASR, robust accuracy and, for explanation runs, FSR / CR.

  Robust accuracy is the fraction of triggered test images still classified as their
  true label (``None`` when there are none). For an explanation backdoor the "attack"
  images are all triggered test images with their true labels, so
  ``attack_success_rate`` is replaced by ``triggered_accuracy``.
  """
  suffix = f"/{name}" if name else ""
  clean = accuracy(logits(ctx, variables, ctx.test_images, transform, "logits" + suffix), ctx.test_labels)
  att_logits = logits(ctx, variables, ctx.attack_images, transform, "logits" + suffix)
  att = accuracy(att_logits, ctx.attack_labels)
  out = {"clean_accuracy": clean}
  if ctx.attack_true_labels is not None:
    out["robust_accuracy"] = accuracy(att_logits, ctx.attack_true_labels)
  if ctx.is_explanation_run:
    out["triggered_accuracy"] = att
    f_t = fooled(ctx, variables, ctx.attack_images, transform, "fooled" + suffix)
    f_c = fooled(ctx, variables, ctx.test_images, transform, "fooled" + suffix)
    out["fsr"] = float(f_t.mean())
    out["cr"] = float(1.0 - f_c.mean())
  else:
    out["attack_success_rate"] = att
  return out


class Timer:
  """Wall-clock seconds of a block: ``with Timer() as t: ...; t.seconds``."""

  def __enter__(self):
    self.start = time.time()
    return self

  def __exit__(self, *a):
    self.seconds = time.time() - self.start
    return False


def check_images(images: Any) -> None:
  chex.assert_rank(images, 4)
