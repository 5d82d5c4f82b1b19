r"""Cross-check of explain.faithfulness against independent PyTorch/numpy implementations.

Same model (a small CNN defined here twice: in JAX and, with the same weights, in
PyTorch), same images (real GTSRB test images), same maps (|input gradient| of the
predicted class, all distinct), same settings:

* deletion: Quantus ``PixelFlipping`` (zero baseline, 32 of the 3 * 32 * 32 features per
  step; every third step ends on whole pixels) against ``faithfulness.deletion(n_steps=32,
  baseline='zeros')``;
* insertion: the same Quantus loop started from the zero image with a perturbation that
  writes the original values back, against ``faithfulness.insertion(baseline='zeros')``;
* ROAD: pytorch-grad-cam's ``RemoveMostRelevantFirst`` / ``RemoveLeastRelevantFirst`` with
  ``NoisyLinearImputer(noise=0)`` (scipy ``spsolve``, an exact sparse solve) at the
  percentiles 10..90, against ``faithfulness.road(noise=0)`` with the same numbers of
  removed pixels; plus the imputed images themselves against ``linear_impute``;
* similarities: scikit-image ``structural_similarity`` and scipy ``spearmanr`` / ``pearsonr``.

The reference side runs in a separate virtualenv (it needs torch + torchvision, which do
not import beside the project's torch 2.13), e.g.::

  python3 -m venv /tmp/xvenv_f
  /tmp/xvenv_f/bin/pip install torch==2.14.1 torchvision==0.29.1 grad-cam==1.5.7 quantus==0.6.0
  .venv/bin/python benchmarks/faithfulness_crosscheck.py --ref_python=/tmp/xvenv_f/bin/python

It prints one table of maximum absolute differences; not a CI test.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

B, H, W, C, K = 8, 32, 32, 3, 10
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def make_weights(seed: int = 0) -> dict[str, np.ndarray]:
  """HWIO conv kernels and a dense layer, He-scaled."""
  rng = np.random.default_rng(seed)
  he = lambda shape, fan: (rng.normal(size=shape) * np.sqrt(2.0 / fan)).astype(np.float32)
  return {"k1": he((3, 3, C, 8), 9 * C), "b1": (0.1 * rng.normal(size=8)).astype(np.float32),
          "k2": he((3, 3, 8, 16), 72), "b2": (0.1 * rng.normal(size=16)).astype(np.float32),
          "w3": he((16, K), 16), "b3": (0.1 * rng.normal(size=K)).astype(np.float32)}


# ----------------------------------------------------------------------------- JAX side

def jax_side(work: str) -> dict[str, np.ndarray]:
  import jax
  import jax.numpy as jnp

  from backdoor_jax.explain import faithfulness as F
  from backdoor_jax.explain import imputation
  from backdoor_jax.explain import sanity as S

  wts = make_weights()
  data = np.load(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gtsrb32.npz"))
  raw = data["test_images"][:B]
  x = jnp.asarray((raw / 255.0 - 0.5) / 0.25, jnp.float32)

  def conv(v, k, b, stride):
    y = jax.lax.conv_general_dilated(v, k, (stride, stride), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + b)

  def logits_fn(p, v):
    h = conv(v, p["k1"], p["b1"], 1)
    h = conv(h, p["k2"], p["b2"], 2)
    return jnp.mean(h, axis=(1, 2)) @ p["w3"] + p["b3"]

  p = {k: jnp.asarray(v) for k, v in wts.items()}
  logits = logits_fn(p, x)
  t = jnp.argmax(logits, -1)
  grad = jax.grad(lambda v: jnp.sum(jnp.take_along_axis(logits_fn(p, v), t[:, None], -1)))(x)
  maps = jnp.sum(jnp.abs(grad), -1)
  jitter = np.random.default_rng(2).uniform(size=maps.shape) * 1e-3 * float(jnp.max(maps))
  maps = maps + jnp.asarray(jitter, maps.dtype)  # dead-ReLU areas tie; both sides get these maps
  lo, hi = jnp.min(maps, axis=(1, 2), keepdims=True), jnp.max(maps, axis=(1, 2), keepdims=True)
  maps = (maps - lo) / (hi - lo)  # in [0, 1], as pytorch-grad-cam's LeRF (1 - cam) expects
  assert all(len(np.unique(np.asarray(m))) == H * W for m in maps), "maps must have distinct values"

  out = {"x": np.asarray(x), "maps": np.asarray(maps), "targets": np.asarray(t), "logits": np.asarray(logits),
         **{"w_" + k: v for k, v in wts.items()}}
  d = F.deletion(logits_fn, x, maps, t, n_steps=32, baseline="zeros", variables=p)
  i = F.insertion(logits_fn, x, maps, t, n_steps=32, baseline="zeros", variables=p)
  out.update(del_scores=np.asarray(d.scores), ins_scores=np.asarray(i.scores), del_auc=np.asarray(d.auc),
             ins_auc=np.asarray(i.auc))
  n = H * W
  m_np = np.asarray(maps)
  for order, sign in (("morf", 1.0), ("lerf", -1.0)):
    # pytorch-grad-cam keeps the pixels below the p-th percentile of cam (MoRF) or of 1 - cam
    # (LeRF); the count can differ by one between images, so each image is its own batch.
    counts = np.array([[n - int(np.sum(v < np.percentile(v, q))) for q in PERCENTILES]
                       for v in (m_np if sign > 0 else 1.0 - m_np)])  # (B, P)
    scores, imputed = [], []
    for b in range(B):
      fr = [c / n for c in counts[b]]
      r = F.road(logits_fn, x[b:b + 1], maps[b:b + 1], t[b:b + 1], fractions=fr, order=order, noise=0.0,
                 variables=p)  # default CG tolerance
      scores.append(np.asarray(r.scores[0]))
      removed = [F.road_removed(maps[b:b + 1], f, order) for f in fr]
      imputed.append(np.stack([np.asarray(imputation.linear_impute(x[b:b + 1], rm))[0] for rm in removed]))
    out[f"road_{order}"] = np.stack(scores)                        # (B, P)
    out[f"impute_{order}"] = np.stack(imputed, axis=1)             # (P, B, H, W, C)
    out[f"road_{order}_counts"] = counts
  # Similarities between each map and a distorted copy (with ties: a quarter of the pixels set to 0).
  other = np.asarray(maps) * np.random.default_rng(1).uniform(0.5, 1.5, size=maps.shape)
  other[:, :8] = 0.0
  norm = lambda a: (a - a.min(axis=(1, 2), keepdims=True)) / (a.max(axis=(1, 2), keepdims=True)
                                                            - a.min(axis=(1, 2), keepdims=True))
  a, b = norm(m_np).astype(np.float32), norm(other).astype(np.float32)
  out["sim_a"], out["sim_b"] = a, b
  for name, v in S.similarities(jnp.asarray(a), jnp.asarray(b)).items():
    out["sim_" + name] = np.asarray(v)
  return out


# ----------------------------------------------------------------------------- reference side

def reference_side(inp: str, outp: str) -> None:
  import quantus
  import scipy.stats
  import skimage.metrics
  import torch
  from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                                RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
  from pytorch_grad_cam.metrics.road import NoisyLinearImputer
  from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

  d = dict(np.load(inp))
  torch.set_num_threads(2)

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.c1 = torch.nn.Conv2d(C, 8, 3, 1, 1)
      self.c2 = torch.nn.Conv2d(8, 16, 3, 2, 1)
      self.fc = torch.nn.Linear(16, K)

    def forward(self, v):
      h = torch.relu(self.c2(torch.relu(self.c1(v))))
      return self.fc(h.mean(dim=(2, 3)))

  net = Net().eval()
  with torch.no_grad():
    net.c1.weight.copy_(torch.from_numpy(d["w_k1"].transpose(3, 2, 0, 1)))
    net.c1.bias.copy_(torch.from_numpy(d["w_b1"]))
    net.c2.weight.copy_(torch.from_numpy(d["w_k2"].transpose(3, 2, 0, 1)))
    net.c2.bias.copy_(torch.from_numpy(d["w_b2"]))
    net.fc.weight.copy_(torch.from_numpy(d["w_w3"].T))
    net.fc.bias.copy_(torch.from_numpy(d["w_b3"]))
  x = np.ascontiguousarray(d["x"].transpose(0, 3, 1, 2))  # NCHW
  maps, t = d["maps"], d["targets"].astype(int)
  out = {}
  with torch.no_grad():
    out["logits"] = net(torch.from_numpy(x)).numpy()

  # Quantus ranks the C * H * W features (the map broadcast over channels) and needs a step
  # size dividing H * W: 32 features per step, so every 3rd step ends on 32 whole pixels.
  common = dict(features_in_step=H * W // 32, perturb_baseline=0.0, normalise=False, abs=False,
                disable_warnings=True, display_progressbar=False)
  a_batch = maps[:, None]
  dele = quantus.PixelFlipping(**common)(model=net, x_batch=x, y_batch=t, a_batch=a_batch, softmax=True,
                                         channel_first=True, device="cpu")
  out["del_scores"] = np.asarray(dele, np.float64)[:, C - 1::C]
  x_flat = x.reshape(B, -1)

  def insert(arr, indices, **kwargs):
    res = arr.copy()
    np.put_along_axis(res, indices, np.take_along_axis(x_flat, indices, axis=1), axis=1)
    return res

  ins = quantus.PixelFlipping(**{**common, "perturb_func": insert})(
      model=net, x_batch=np.zeros_like(x), y_batch=t, a_batch=a_batch, softmax=True, channel_first=True,
      device="cpu")
  out["ins_scores"] = np.asarray(ins, np.float64)[:, C - 1::C]

  targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in t]
  for order, cls in (("morf", RemoveMostRelevantFirst), ("lerf", RemoveLeastRelevantFirst)):
    scores, imputed = [], []
    for q in PERCENTILES:
      metric = PerturbationConfidenceMetric(cls(q, NoisyLinearImputer(noise=0.0)))
      s, vis = metric(torch.from_numpy(x), maps.astype(np.float32), targets, net, return_visualization=True,
                      return_diff=False)
      scores.append(s)
      imputed.append(vis.numpy().transpose(0, 2, 3, 1))
    out[f"road_{order}"] = np.stack(scores, -1)
    out[f"impute_{order}"] = np.stack(imputed)
  a, b = d["sim_a"], d["sim_b"]
  out["sim_ssim"] = np.array([skimage.metrics.structural_similarity(a[i], b[i], data_range=1.0) for i in range(B)])
  out["sim_spearman"] = np.array([scipy.stats.spearmanr(a[i].ravel(), b[i].ravel())[0] for i in range(B)])
  out["sim_pearson"] = np.array([scipy.stats.pearsonr(a[i].ravel(), b[i].ravel())[0] for i in range(B)])
  np.savez(outp, **out)


# ----------------------------------------------------------------------------- compare

def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ref_python", default="/tmp/xvenv_f/bin/python",
                  help="python of a venv with torch, torchvision, grad-cam, quantus, scikit-image")
  ap.add_argument("--reference_side", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.reference_side:
    reference_side(*args.reference_side)
    return
  with tempfile.TemporaryDirectory() as work:
    mine = jax_side(work)
    inp, outp = os.path.join(work, "in.npz"), os.path.join(work, "ref.npz")
    np.savez(inp, **mine)
    subprocess.run([args.ref_python, os.path.abspath(__file__), "--reference_side", inp, outp], check=True)
    ref = dict(np.load(outp))
  trapz = lambda s: np.trapezoid(s, np.linspace(0, 1, s.shape[-1]), axis=-1)
  rows = [
      ("logits (model twins)", mine["logits"], ref["logits"]),
      ("deletion curve vs Quantus PixelFlipping", mine["del_scores"][:, 1:], ref["del_scores"]),
      ("deletion AUC", mine["del_auc"], trapz(np.concatenate([np.asarray(mine["del_scores"][:, :1], np.float64),
                                                              ref["del_scores"]], 1))),
      ("insertion curve vs Quantus loop from zeros", mine["ins_scores"][:, 1:], ref["ins_scores"]),
      ("insertion AUC", mine["ins_auc"], trapz(np.concatenate([np.asarray(mine["ins_scores"][:, :1], np.float64),
                                                               ref["ins_scores"]], 1))),
      ("ROAD MoRF scores vs pytorch-grad-cam", mine["road_morf"], ref["road_morf"]),
      ("ROAD LeRF scores vs pytorch-grad-cam", mine["road_lerf"], ref["road_lerf"]),
      ("ROAD MoRF imputed images (CG vs spsolve)", mine["impute_morf"], ref["impute_morf"]),
      ("ROAD LeRF imputed images (CG vs spsolve)", mine["impute_lerf"], ref["impute_lerf"]),
      ("SSIM vs scikit-image", mine["sim_ssim"], ref["sim_ssim"]),
      ("Spearman vs scipy", mine["sim_spearman"], ref["sim_spearman"]),
      ("Pearson vs scipy", mine["sim_pearson"], ref["sim_pearson"]),
  ]
  print(f"{B} GTSRB test images, {H}x{W}, maps = |input gradient| (distinct values), float32\n")
  print(f"| quantity | max abs difference | value range |\n| --- | --- | --- |")
  for name, a, b in rows:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    print(f"| {name} | {np.max(np.abs(a - b)):.2e} | [{min(a.min(), b.min()):.3g}, {max(a.max(), b.max()):.3g}] |")
  print(f"\nROAD removed pixels per percentile (of {H * W}), image 0: MoRF {mine['road_morf_counts'][0].tolist()}, "
        f"LeRF {mine['road_lerf_counts'][0].tolist()}")


if __name__ == "__main__":
  sys.exit(main())
