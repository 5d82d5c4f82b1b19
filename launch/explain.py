r"""Grad-CAM report of a trained run: figures and trigger-region scores in WORKDIR/explain/.

  python launch/explain.py --workdir=runs/digits
  python launch/explain.py --workdir=runs/digits --reference=runs/digits_clean --max_test=500

Writes gradcam_clean_vs_triggered.png, layers.png, feature_maps.png and explain.json
(see backdoor_jax/analysis.py); with --faithfulness also faithfulness.json and
faithfulness_curves.png (backdoor_jax/faithfulness_report.py). --reference names a clean-trained run on the same
data; its maps are shown and scored on the same images. --method picks any registered
explanation method (gradcam, gradcam_pp, simple_grad, vbp, or one you register).
"""

from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training work dir (config.json + checkpoints/).")
_REFERENCE = flags.DEFINE_string("reference", None, "Work dir of a clean-trained run on the same data.")
_LAYER = flags.DEFINE_string("layer", None, "Explained layer (default: the deepest spatial layer with a map of at "
                             "least 4x4, as in training).")
_METHOD = flags.DEFINE_string("method", "gradcam", "Explanation method (a name in backdoor_jax.explain.registry).")
_FEATURE_LAYER = flags.DEFINE_string("feature_layer", None,
                                     "Layer of feature_maps.png (default: the Grad-CAM layer).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Clean/triggered pairs in gradcam_clean_vs_triggered.png.")
_MAX_TEST = flags.DEFINE_integer("max_test", 0, "Score a seeded subset of this many test images (0: all).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per jitted batch.")
_TOP_K = flags.DEFINE_integer("top_k", 8, "Channels shown in feature_maps.png.")
_IOU_THRESHOLD = flags.DEFINE_float("iou_threshold", 0.5, "Map threshold of the IoU with the trigger region.")
_FAITHFULNESS = flags.DEFINE_bool("faithfulness", False,
                                  "Also score the Grad-CAM maps' faithfulness (deletion / insertion, ROAD, region "
                                  "perturbation, randomisation and random-logit tests) on clean and triggered "
                                  "images: faithfulness.json and faithfulness_curves.png.")
flags.mark_flags_as_required(["workdir"])



def main(argv):
  del argv
  from backdoor_jax import cli
  cli.quiet_library_logs()
  if _REFERENCE.value:  # a poisoned or attacked reference is no clean baseline: say so, then go on
    from backdoor_jax.train import restore
    cli.run_or_exit(lambda: restore.warn_if_not_clean(_REFERENCE.value))
  from backdoor_jax import analysis
  rec = cli.run_or_exit(lambda: analysis.explain_run(
      _WORKDIR.value, reference=_REFERENCE.value, layer=_LAYER.value, feature_layer=_FEATURE_LAYER.value,
      num_images=_NUM_IMAGES.value, max_test=_MAX_TEST.value, batch_size=_BATCH_SIZE.value, top_k=_TOP_K.value,
      iou_threshold=_IOU_THRESHOLD.value, method=_METHOD.value))
  for role, m in rec["models"].items():
    c, t = m["clean"], m["triggered"]
    print(f"{role} ({m['layer']}): energy in trigger clean={c['energy_in_trigger']:.4f} "
          f"triggered={t['energy_in_trigger']:.4f}; pointing clean={c['pointing_game']:.4f} "
          f"triggered={t['pointing_game']:.4f}; acc clean={c['accuracy']:.4f} ASR={t['attack_success_rate']:.4f}")
  if _FAITHFULNESS.value:
    from backdoor_jax import faithfulness_report as fr
    frec = cli.run_or_exit(lambda: fr.faithfulness_run(
        _WORKDIR.value, reference=_REFERENCE.value, layer=_LAYER.value, max_test=_MAX_TEST.value or 200,
        out_dir=rec["out_dir"], settings=fr.FaithfulnessSettings(batch_size=min(_BATCH_SIZE.value, 100))))
    for row in fr.summary_rows(frec):
      print("faithfulness " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
  print(f"-> {rec['out_dir']}")


if __name__ == "__main__":
  from backdoor_jax import cli
  cli.run_app(main, workdir_flag="workdir", workdir_must_exist=True)
