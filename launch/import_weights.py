r"""Converts a torchvision state_dict file into an init checkpoint for training.

  python launch/import_weights.py --arch=resnet50 --src=resnet50.pth --dst=weights/resnet50
  python launch/train.py --config=configs/pets_transfer.py \
      --config.model.init_checkpoint=weights/resnet50 --config.data.data_dir=DATA --workdir=runs/pets

``--src`` is a ``.pth``/``.pt`` file (read with torch.load(weights_only=True); needs
torch) or a ``.safetensors`` file (no torch needed). The head keeps the file's number
of classes unless ``--num_classes`` says otherwise; training with another number of
classes replaces the head anyway (reported at start).
"""
import hashlib
import os

from absl import flags

_ARCH = flags.DEFINE_string("arch", None, "torchvision architecture, e.g. resnet50, vgg19_bn, densenet121.")
_SRC = flags.DEFINE_string("src", None, "state_dict file (.pth, .pt, .bin or .safetensors).")
_DST = flags.DEFINE_string("dst", None, "Output folder of the init checkpoint (must not exist yet).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 0, "Head size; 0 = the file's.")
_AUX = flags.DEFINE_bool("aux_logits", False, "googlenet: import the auxiliary heads too.")
flags.mark_flags_as_required(["arch", "src", "dst"])


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def run(arch: str, src: str, dst: str, num_classes: int = 0, aux_logits: bool = False) -> dict:
  """Imports ``src`` and writes the init checkpoint ``dst``; returns its metadata.

  Raises:
    ConfigError: a bad head size, a ``src`` that is a folder or missing, a ``dst`` that
      exists, or anything the import refuses.
  """
  from backdoor_jax.errors import ConfigError
  if num_classes < 0:
    raise ConfigError(f"--num_classes={num_classes} is invalid; allowed: 0 (the file's head) or an integer >= 1")
  if os.path.isdir(src):
    raise ConfigError(f"--src={src} is a folder, not a weight file (.pth, .pt, .bin or .safetensors)")
  if os.path.exists(dst):
    raise ConfigError(f"--dst={dst} already exists (it already holds files); the init checkpoint goes to a new folder")
  from backdoor_jax import models
  from backdoor_jax.models import torchvision_import
  from backdoor_jax.train import init_weights
  options = {"aux_logits": True} if aux_logits else {}
  result = torchvision_import.import_torchvision(arch, src, num_classes=num_classes or None, **options)
  meta = {"arch": arch, "source": os.path.abspath(src), "source_sha256": _sha256(src),
          "num_classes": result.num_classes, "file_num_classes": result.file_num_classes,
          "skipped_keys": result.skipped, "model_options": options,
          "num_params": models.count_params(result.variables["params"])}
  init_weights.save_init_checkpoint(dst, result.variables, meta)
  return meta


def main(argv):
  del argv
  from backdoor_jax import cli
  cli.quiet_library_logs()
  meta = cli.run_or_exit(lambda: run(_ARCH.value, _SRC.value, _DST.value, _NUM_CLASSES.value, _AUX.value))
  skipped = ", ".join(meta["skipped_keys"]) or "none"
  print(f"{meta['arch']}: {meta['num_params']:,} params, {meta['num_classes']} classes "
        f"(file {meta['file_num_classes']}); skipped keys: {skipped} -> {os.path.abspath(_DST.value)}")
  if meta["arch"] == "googlenet":
    print("note: torchvision's pretrained GoogLeNet expects transform_input=True "
          "(--config.model.transform_input=True with ImageNet mean/std)")


if __name__ == "__main__":
  from backdoor_jax import cli
  cli.run_app(main)
