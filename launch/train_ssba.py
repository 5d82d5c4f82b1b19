r"""Trains the small SSBA (StegaStamp-style) encoder/decoder and saves the encoder as a trigger.

  python launch/train_ssba.py --dataset=gtsrb --path=../shared/data/gtsrb32.npz --out=runs/ssba/gtsrb_encoder.npz
  python launch/train.py --config=configs/badnets.py:gtsrb_ssba --config.data.path=../shared/data/gtsrb32.npz \
      --config.trigger.ssba.path=runs/ssba/gtsrb_encoder.npz --workdir=runs/ssba/gtsrb

Trains on the training split only, with random bit strings; the saved trigger hides one
fixed bit string drawn from --seed. Writes OUT.metrics.jsonl (step, loss, bit accuracy,
PSNR) and, while training, OUT.ckpt.npz: rerunning the same command after a kill resumes
from the last checkpoint (same result as an uninterrupted run); rerunning it after it
finished prints the stored result. The last line gives PSNR and bit accuracy on the test
split (encoded images rounded to uint8).
"""
from absl import flags

_OUT = flags.DEFINE_string("out", None, "Output .npz (the encoder, the bit string, the image size).")
_DATASET = flags.DEFINE_string("dataset", "digits", "Dataset name (see backdoor_jax.data).")
_PATH = flags.DEFINE_string("path", "", "Dataset file/folder (gtsrb, npz).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Image side (divisible by 4).")
_MAX_TRAIN = flags.DEFINE_integer("max_train", 0, "0 = all training images.")
_MAX_EVAL = flags.DEFINE_integer("max_eval", 2000, "Test images for the final PSNR / bit accuracy.")
_BITS = flags.DEFINE_integer("num_bits", 16, "Length of the hidden bit string.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps.")
_FEATURES = flags.DEFINE_integer("features", 32, "Channels of the encoder/decoder convolutions.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per training step.")
_LR = flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
_MAX_RESIDUAL = flags.DEFINE_float("max_residual", 8.0, "Bound on the residual, pixel units of 255.")
_RESIDUAL_WEIGHT = flags.DEFINE_float("residual_weight", 0.0,
                                        "Final weight of the residual's mean square (0: the bound alone sets the PSNR).")
_RAMP_START = flags.DEFINE_integer("ramp_start", 500, "Steps without the residual penalty (bits first).")
_RAMP = flags.DEFINE_integer("ramp_steps", 1000, "Steps over which the residual weight then ramps up from 0.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Steps per metrics record.")
_CKPT_EVERY = flags.DEFINE_integer("checkpoint_every", 250, "Steps between checkpoints.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation, the batches and the bit string.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["out"])


def main(argv):
  del argv
  from backdoor_jax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()
  cli.run_or_exit(_main)


def _main():
  from backdoor_jax.data import load_dataset  # pylint: disable=g-import-not-at-top
  from backdoor_jax.triggers import ssba_train  # pylint: disable=g-import-not-at-top
  ds = load_dataset(_DATASET.value, path=_PATH.value or None, image_size=_IMAGE_SIZE.value, seed=_SEED.value,
                    max_train=_MAX_TRAIN.value or None)
  info = ssba_train.train_encoder_file(
      _OUT.value, ds.train_images, ds.test_images, seed=_SEED.value, steps=_STEPS.value, num_bits=_BITS.value,
      batch_size=_BATCH.value, lr=_LR.value, max_residual=_MAX_RESIDUAL.value,
      residual_weight=_RESIDUAL_WEIGHT.value, ramp_start=_RAMP_START.value, ramp_steps=_RAMP.value,
      features=_FEATURES.value,
      log_every=_LOG_EVERY.value, checkpoint_every=_CKPT_EVERY.value, max_eval=_MAX_EVAL.value,
      progress=_PROGRESS.value)
  print(f"test images ({info['eval_images']}): psnr={info['psnr']:.2f} dB (min {info['psnr_min']:.2f}, "
        f"max change {info['max_abs_change']:.0f} px) bit_accuracy fixed={info['bit_accuracy_fixed']:.4f} "
        f"random={info['bit_accuracy_random']:.4f}; trained {info['train_seconds']:.0f} s "
        f"({info['steps_per_second']:.2f} steps/s) -> {_OUT.value}")


if __name__ == "__main__":
  from backdoor_jax import cli
  cli.run_app(main)
