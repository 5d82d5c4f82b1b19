r"""Trains the small SSBA (StegaStamp-style) encoder/decoder and saves the encoder as a trigger.

  python launch/train_ssba.py --out=runs/ssba/digits_encoder.npz
  python launch/train_ssba.py --dataset=gtsrb --path=../shared/data/gtsrb32.npz --out=runs/ssba/gtsrb_encoder.npz
  python launch/train.py --config=configs/badnets.py:digits_ssba \
      --config.trigger.ssba.path=runs/ssba/digits_encoder.npz --workdir=runs/ssba/digits

Trains on the training split only, with random bit strings; the saved trigger hides one
fixed bit string drawn from --seed. Prints the decoder's bit accuracy and the PSNR of
encoded vs clean images (and of the saved trigger on the test split).
"""
from absl import flags

_OUT = flags.DEFINE_string("out", None, "Output .npz (the encoder, the bit string, the image size).")
_DATASET = flags.DEFINE_string("dataset", "digits", "Dataset name (see backdoor_jax.data).")
_PATH = flags.DEFINE_string("path", "", "Dataset file/folder (gtsrb, npz).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Image side (divisible by 4).")
_MAX_TRAIN = flags.DEFINE_integer("max_train", 0, "0 = all training images.")
_BITS = flags.DEFINE_integer("num_bits", 16, "Length of the hidden bit string.")
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps.")
_FEATURES = flags.DEFINE_integer("features", 32, "Channels of the encoder/decoder convolutions.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per training step.")
_MAX_RESIDUAL = flags.DEFINE_float("max_residual", 8.0, "Bound on the residual, pixel units of 255.")
_RESIDUAL_WEIGHT = flags.DEFINE_float("residual_weight", 2.0, "Weight of the residual's mean square.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation, the batches and the bit string.")
flags.mark_flags_as_required(["out"])


def main(argv):
  del argv
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from backdoor_jax import cli, triggers  # pylint: disable=g-import-not-at-top
  from backdoor_jax.data import load_dataset  # pylint: disable=g-import-not-at-top
  from backdoor_jax.triggers import ssba  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()
  ds = load_dataset(_DATASET.value, path=_PATH.value or None, image_size=_IMAGE_SIZE.value, seed=_SEED.value,
                    max_train=_MAX_TRAIN.value or None)
  key = jax.random.key(_SEED.value)
  t0 = time.time()
  enc, _, info = ssba.train_stega(ds.train_images, key, num_bits=_BITS.value, steps=_STEPS.value,
                                  batch_size=_BATCH.value, max_residual=_MAX_RESIDUAL.value,
                                  residual_weight=_RESIDUAL_WEIGHT.value, features=_FEATURES.value)
  bits = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 11), 0.5, (_BITS.value,)), np.float32)
  trig = ssba.SSBATrigger(params=enc, bits=jax.numpy.asarray(bits),
                          max_residual=jax.numpy.asarray(_MAX_RESIDUAL.value, jax.numpy.float32))
  x = ds.test_images[:1000]
  y = np.asarray(jax.jit(triggers.apply_trigger)(trig, x))
  mse = ((y.astype(np.float64) - x) ** 2).mean(axis=(1, 2, 3))
  info["test_psnr_fixed_bits"] = float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-6))))
  info["test_max_abs_change"] = float(np.abs(y.astype(np.int16) - x).max())
  info["train_seconds"] = time.time() - t0
  ssba.save_encoder(_OUT.value, enc, bits=bits, image_hw=ds.train_images.shape[1:3],
                    max_residual=_MAX_RESIDUAL.value, info=info)
  print(" ".join(f"{k}={v:.4g}" for k, v in info.items()) + f" -> {_OUT.value}")


if __name__ == "__main__":
  from backdoor_jax import cli
  cli.run_app(main)
