r"""Attacks x defenses (BackdoorBench-style): every attack trained, every defense run on each model.

Rows: a clean model, BadNets, blend, photo filter, Moire, WaNet, label-consistent and
SSBA (its encoder is trained into the work dir the first time); columns: Fine-Pruning,
Neural Cleanse (detection, then unlearning), Activation Clustering, Spectral Signatures
(detection, then retraining), STRIP and TV denoising. Writes
WORKDIR/report/attacks_x_defenses.{md,csv,png}; a rerun resumes where it stopped.

Variants (``--config=configs/attacks_x_defenses.py:VARIANT``):
  gtsrb   GTSRB subset (5k train / 1.5k test, 10 epochs, small CNN); needs --config.shared.data.path
  digits  the embedded digits (offline; CPU minutes)

Settings: ``shared.*`` apply to every attack (data, subset sizes, epochs, seed);
``attacks.NAME.*`` is that attack's full training config; ``defenses.*`` the defenses'.

Example:
  python launch/sweep.py --config=configs/attacks_x_defenses.py:gtsrb \
      --config.shared.data.path=../shared/data/gtsrb32.npz --workdir=runs/axd_gtsrb
  python launch/sweep.py --config=configs/attacks_x_defenses.py:digits \
      '--config.table.attacks=("clean","badnets","blend")' --workdir=runs/axd_digits
"""
from backdoor_jax.configs.attacks_x_defenses import ATTACKS, DEFENSES, get_config  # noqa: F401
