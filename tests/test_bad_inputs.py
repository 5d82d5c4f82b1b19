"""Bad input to every launcher ends in exactly one ``error:`` line, a non-zero exit and no traceback.

The launchers run in this process (``runpy`` of ``launch/NAME.py`` as ``__main__``, so
their real ``if __name__ == "__main__"`` block runs, with ``cli.run_app``); their absl
flags are removed again after each case. Almost every case fails while the command line
is parsed or before any data is loaded, so the table stays fast.

Each case: (id, launcher, argv, expected fragment of the error line). ``{tmp}`` is a
fresh folder, ``{file}`` a plain text file in it, ``{npz999}`` a small npz dataset with
one stray label 999, and ``{run_*}`` work dirs in the named broken state.
"""
from __future__ import annotations

import errno
import json
import os
import runpy
import sys

import numpy as np
import pytest
from absl import app, flags

from backdoor_jax import cli, io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BADNETS = "--config=configs/badnets.py"
T = (BADNETS, "--workdir={tmp}/w")          # a valid train command line, to add one bad value to
TINY = ("--config.data.max_train=64", "--config.data.max_test=32", "--config.train.epochs=1")

CASES = [
    # --- train.py: non-finite and out-of-range config values (config_checks) ---
    ("lr_nan", "train", T + ("--config.train.lr=nan",), "train.lr=nan is not finite"),
    ("lr_inf", "train", T + ("--config.train.lr=inf",), "train.lr=inf is not finite"),
    ("lr_neg_inf", "train", T + ("--config.train.lr=-inf",), "is not finite"),
    ("lr_negative", "train", T + ("--config.train.lr=-0.1",), "train.lr=-0.1 is invalid; allowed: a number > 0"),
    ("lr_zero", "train", T + ("--config.train.lr=0",), "train.lr=0.0 is invalid"),
    ("epochs_zero", "train", T + ("--config.train.epochs=0",), "train.epochs=0 is invalid; allowed: an integer >= 1"),
    ("epochs_negative", "train", T + ("--config.train.epochs=-3",), "train.epochs=-3"),
    ("grad_clip_negative", "train", T + ("--config.train.grad_clip=-1",), "train.grad_clip=-1.0 is invalid"),
    ("weight_decay_negative", "train", T + ("--config.train.weight_decay=-0.01",), "train.weight_decay=-0.01"),
    ("weight_decay_nan", "train", T + ("--config.train.weight_decay=nan",), "train.weight_decay=nan is not finite"),
    ("momentum_above_one", "train", T + ("--config.train.momentum=1.5",), "train.momentum=1.5"),
    ("warmup_negative", "train", T + ("--config.train.warmup_epochs=-1",), "train.warmup_epochs=-1.0"),
    ("batch_size_zero", "train", T + ("--config.train.batch_size=0",), "train.batch_size=0 is invalid"),
    ("eval_batch_negative", "train", T + ("--config.train.eval_batch_size=-4",), "train.eval_batch_size=-4"),
    ("loss_scale_zero", "train", T + ("--config.train.loss_scale_init=0",), "train.loss_scale_init=0.0"),
    ("prefetch_negative", "train", T + ("--config.train.prefetch=-1",), "train.prefetch=-1"),
    ("keep_zero", "train", T + ("--config.checkpoint.keep=0",), "checkpoint.keep=0 is invalid"),
    ("seed_negative", "train", T + ("--config.seed=-1",), "seed=-1 is invalid; allowed: an integer in 0..4294967295"),
    ("seed_too_big", "train", T + ("--config.seed=4294967296",), "seed=4294967296 is invalid"),
    ("trigger_seed_too_big", "train", T + ("--config.trigger.seed=99999999999",), "trigger.seed=99999999999"),
    ("widths_empty", "train", T + ("--config.model.widths=()",), "model.widths=() is invalid; allowed: a non-empty"),
    ("widths_zero", "train", T + ("--config.model.widths=(16,0)",), "model.widths=(16, 0) is invalid"),
    ("max_train_negative", "train", T + ("--config.data.max_train=-5",), "data.max_train=-5"),
    ("image_size_negative", "train", T + ("--config.data.image_size=-1",), "data.image_size=-1"),
    ("num_shards_zero", "train", T + ("--config.data.num_shards=0",), "data.num_shards=0"),
    ("poison_rate_above_one", "train", T + ("--config.poison.rate=1.5",), "poison.rate=1.5 is invalid"),
    ("poison_rate_nan", "train", T + ("--config.poison.rate=nan",), "poison.rate=nan is not finite"),
    ("trigger_size_nan", "train", T + ("--config.trigger.size=nan",), "trigger.size=nan is not finite"),
    ("data_mean_inf", "train", ("--config=configs/pets_transfer.py:offline", "--workdir={tmp}/w",
                                "--config.data.mean=(0.5,1e999,0.5)"), "data.mean=(0.5, inf, 0.5) is not finite"),
    # --- train.py: the command line itself ---
    ("unknown_key", "train", T + ("--config.train.lrr=1",), "unknown config key 'train.lrr' (--config.train.lrr); "
                                                           "nearest valid key: train.lr"),
    ("unknown_section", "train", T + ("--config.trian.lr=1",), "nearest valid key: train.lr"),
    ("unknown_top_key", "train", T + ("--config.sed=1",), "unknown config key 'sed'"),
    ("unknown_flag", "train", T + ("--seed=1",), "unknown flag --seed; did you mean --config.seed?"),
    ("unknown_flag_lr", "train", T + ("--lr=1",), "did you mean --config.train.lr?"),
    ("missing_config_file", "train", ("--config=configs/nope.py", "--workdir={tmp}/w"),
     "config file 'configs/nope.py' (--config) cannot be read: no such file"),
    ("config_is_folder", "train", ("--config=configs", "--workdir={tmp}/w"), "cannot be read: it is a folder"),
    ("config_bad_variant", "train", ("--config=configs/badnets.py:nope", "--workdir={tmp}/w"),
     "unknown variant 'nope'"),
    ("config_file_raises", "train", ("--config={tmp}/broken_config.py", "--workdir={tmp}/w"),
     "failed: ZeroDivisionError"),
    ("config_not_python", "train", ("--config={file}", "--workdir={tmp}/w"), "is not a Python file"),
    ("config_without_get_config", "train", ("--config={tmp}/empty_config.py", "--workdir={tmp}/w"),
     "defines no get_config()"),
    ("no_config", "train", ("--workdir={tmp}/w",), "--config must have a value"),
    ("no_workdir", "train", (BADNETS,), "--workdir must have a value"),
    ("float_for_int", "train", T + ("--config.train.epochs=1.5",), "flag --config.train.epochs=1.5"),
    ("text_for_float", "train", T + ("--config.train.lr=abc",), "could not convert string to float: 'abc'"),
    ("stray_argument", "train", T + ("extra",), "unexpected argument 'extra'"),
    ("override_before_config", "train", ("--config.train.lr=0.1", BADNETS, "--workdir={tmp}/w"), "before a value"),
    ("cpu_devices_negative", "train", T + ("--cpu_devices=-1",), "--cpu_devices=-1 is invalid"),
    ("num_processes_without_address", "train", T + ("--num_processes=2", "--process_id=0"),
     "--coordinator_address='' is invalid"),
    ("process_id_out_of_range", "train", T + ("--coordinator_address=localhost:1", "--num_processes=2",
                                              "--process_id=5"), "--process_id=5 is invalid"),
    # --- train.py: work dir states (checked right after parsing) ---
    ("workdir_is_file", "train", (BADNETS, "--workdir={file}"), "is not a folder"),
    ("workdir_under_file", "train", (BADNETS, "--workdir={file}/sub"), "cannot be created"),
    ("workdir_disk_full", "train", T + ("@full_disk",), "disk full"),
    ("workdir_read_only", "train", T + ("@read_only",), "is not writable"),
    # --- train.py: data and model, before training (need a data load; digits and tiny npz are quick) ---
    ("model_unknown", "train", T + ("--config.model.name=resnet9",), "resnet9"),
    ("dtype_unknown", "train", T + ("--config.train.dtype=float8",), "float8"),
    ("dataset_unknown", "train", T + ("--config.data.name=imagenet_nope",), "imagenet_nope"),
    ("npz_without_path", "train", T + ("--config.data.name=npz",), "needs path"),
    ("npz_path_folder", "train", T + ("--config.data.name=npz", "--config.data.path={tmp}"), "is a folder"),
    ("npz_not_zip", "train", T + ("--config.data.name=npz", "--config.data.path={file}"), "is not an .npz archive"),
    ("npz_stray_label", "train", T + ("--config.data.name=npz", "--config.data.path={npz999}"),
     "label 999 (at train_labels[3]) implies 1000 classes"),
    ("max_train_too_big", "train", T + ("--config.data.max_train=100000",),
     "data.max_train=100000 but the train split of digits has only 1437 images"),
    ("poison_target_out_of_range", "train", T + TINY + ("--config.poison.target=99",), "99"),
    ("trigger_too_big", "train", T + TINY + ("--config.trigger.size=40",), "does not fit"),
    ("image_size_too_small", "train", T + TINY + ("--config.data.image_size=7",),
     "the smallest square input it accepts is 8x8"),
    ("checkpoints_without_config", "train", (BADNETS, "--workdir={run_ckpt_only}") + TINY, "no config.json"),
    ("corrupted_config_json_resume", "train", (BADNETS, "--workdir={run_corrupt}") + TINY, "config.json"),
    # --- explain.py ---
    ("explain_no_workdir", "explain", (), "--workdir must have a value"),
    ("explain_missing_run", "explain", ("--workdir={tmp}/nope",), "nope does not exist"),
    ("explain_workdir_file", "explain", ("--workdir={file}",), "is not a folder"),
    ("explain_ckpt_only", "explain", ("--workdir={run_ckpt_only}",), "holds checkpoints but no config.json"),
    ("explain_corrupt_config", "explain", ("--workdir={run_corrupt}",), "config.json is corrupted (not valid JSON"),
    ("explain_config_not_training", "explain", ("--workdir={run_no_model}",), "is corrupted (no model.name)"),
    ("explain_no_checkpoint", "explain", ("--workdir={run_no_ckpt}",), "has no checkpoint yet"),
    ("explain_reference_missing", "explain", ("--workdir={run_no_ckpt}", "--reference={tmp}/nope"),
     "nope does not exist"),
    ("explain_reference_not_run", "explain", ("--workdir={run_no_ckpt}", "--reference={tmp}"),
     "is not a training work dir (no config.json)"),
    ("explain_bad_int", "explain", ("--workdir={run_no_ckpt}", "--num_images=abc"), "--num_images=abc"),
    ("explain_unknown_flag", "explain", ("--workdir={run_no_ckpt}", "--num_image=3"),
     "unknown flag --num_image; did you mean --num_images?"),
    ("explain_stray_argument", "explain", ("--workdir={run_no_ckpt}", "oops"), "unexpected argument 'oops'"),
    # --- defend.py (default config configs/defenses.py) ---
    ("defend_no_defense", "defend", ("--workdir={run_no_ckpt}",), "--defense must have a value"),
    ("defend_unknown_key", "defend", ("--workdir={run_no_ckpt}", "--defense=strip", "--config.strip.frrr=0.2"),
     "nearest valid key: strip.frr"),
    ("defend_nc_lr_negative", "defend", ("--workdir={run_no_ckpt}", "--defense=neural_cleanse",
                                         "--config.neural_cleanse.lr=-0.1"), "neural_cleanse.lr=-0.1 is invalid"),
    ("defend_nc_lr_nan", "defend", ("--workdir={run_no_ckpt}", "--defense=neural_cleanse",
                                    "--config.neural_cleanse.lr=nan"), "neural_cleanse.lr=nan is not finite"),
    ("defend_nc_epochs_zero", "defend", ("--workdir={run_no_ckpt}", "--defense=neural_cleanse",
                                         "--config.neural_cleanse.epochs=0"), "neural_cleanse.epochs=0"),
    ("defend_unlearn_lr_zero", "defend", ("--workdir={run_no_ckpt}", "--defense=neural_cleanse",
                                          "--config.neural_cleanse.unlearn_lr=0"), "neural_cleanse.unlearn_lr=0.0"),
    ("defend_finetune_lr_negative", "defend", ("--workdir={run_no_ckpt}", "--defense=fine_pruning",
                                               "--config.fine_pruning.finetune_lr=-1"), "fine_pruning.finetune_lr"),
    ("defend_strip_frr", "defend", ("--workdir={run_no_ckpt}", "--defense=strip", "--config.strip.frr=1.5"),
     "strip.frr=1.5 is invalid; allowed: a number in (0, 1)"),
    ("defend_val_fraction_zero", "defend", ("--workdir={run_no_ckpt}", "--defense=strip",
                                            "--config.val_fraction=0"), "val_fraction=0.0"),
    ("defend_seed", "defend", ("--workdir={run_no_ckpt}", "--defense=strip", "--config.seed=-2"), "seed=-2"),
    ("defend_tv_weights_empty", "defend", ("--workdir={run_no_ckpt}", "--defense=tv_denoise",
                                           "--config.tv_denoise.weights=()"), "tv_denoise.weights=()"),
    ("defend_missing_config", "defend", ("--workdir={run_no_ckpt}", "--defense=strip", "--config=configs/nope.py"),
     "cannot be read: no such file"),
    ("defend_missing_run", "defend", ("--workdir={tmp}/nope", "--defense=strip"), "nope does not exist"),
    ("defend_ckpt_only", "defend", ("--workdir={run_ckpt_only}", "--defense=strip"), "but no config.json"),
    ("defend_corrupt_config", "defend", ("--workdir={run_corrupt}", "--defense=strip"), "is corrupted"),
    ("defend_workdir_file", "defend", ("--workdir={file}", "--defense=strip"), "is not a folder"),
    # --- sweep.py ---
    ("sweep_no_config", "sweep", ("--workdir={tmp}/s",), "--config is required"),
    ("sweep_seeds_empty", "sweep", ("--config=configs/sok_badnets.py", "--workdir={tmp}/s",
                                    "--config.sweep.seeds=()"), "sweep.seeds=() is invalid"),
    ("sweep_seed_negative", "sweep", ("--config=configs/sok_badnets.py", "--workdir={tmp}/s",
                                      "--config.sweep.seeds=(0,-3)"), "sweep.seeds=(0, -3)"),
    ("sweep_models_per_step_zero", "sweep", ("--config=configs/sok_badnets.py", "--workdir={tmp}/s",
                                             "--config.sweep.models_per_step=0"), "sweep.models_per_step=0"),
    ("sweep_grid_value_bad", "sweep", ("--config=configs/sok_badnets.py", "--workdir={tmp}/s",
                                       "--config.sweep.grid.poison.rate=(0.1,2.0)"),
     "sweep.grid.poison.rate value 2.0 is invalid"),
    ("sweep_lr_nan", "sweep", ("--config=configs/sok_badnets.py", "--workdir={tmp}/s", "--config.train.lr=nan"),
     "train.lr=nan is not finite"),
    ("sweep_unknown_key", "sweep", ("--config=configs/sok_badnets.py", "--workdir={tmp}/s",
                                    "--config.sweep.model_per_step=2"), "nearest valid key: sweep.models_per_step"),
    ("sweep_bad_variant", "sweep", ("--config=configs/sok_badnets.py:huge", "--workdir={tmp}/s"),
     "unknown variant 'huge'"),
    ("sweep_workdir_file", "sweep", ("--config=configs/sok_badnets.py", "--workdir={file}"), "is not a folder"),
    ("sweep_report_nothing", "sweep", ("--workdir={tmp}/empty_sweep", "--report_only"), "results.csv"),
    # --- import_weights.py ---
    ("import_no_flags", "import_weights", (), "must have a value"),
    ("import_unknown_arch", "import_weights", ("--arch=resnet9", "--src={file}", "--dst={tmp}/out"), "resnet9"),
    ("import_missing_src", "import_weights", ("--arch=resnet18", "--src={tmp}/nope.pth", "--dst={tmp}/out"),
     "nope.pth"),
    ("import_src_not_weights", "import_weights", ("--arch=resnet18", "--src={tmp}/x.safetensors", "--dst={tmp}/out"),
     "x.safetensors"),
    ("import_src_folder", "import_weights", ("--arch=resnet18", "--src={tmp}", "--dst={tmp}/out"),
     "is a folder, not a weight file"),
    ("import_dst_exists", "import_weights", ("--arch=resnet18", "--src={tmp}/x.safetensors", "--dst={tmp}"),
     "already exists"),
    ("import_num_classes_negative", "import_weights", ("--arch=resnet18", "--src={file}", "--dst={tmp}/out",
                                                       "--num_classes=-1"), "--num_classes=-1"),
    ("import_num_classes_text", "import_weights", ("--arch=resnet18", "--src={file}", "--dst={tmp}/out",
                                                   "--num_classes=ten"), "--num_classes=ten"),
]


def _make_fixtures(tmp) -> dict[str, str]:
  """The files and broken work dirs the cases name."""
  paths = {"tmp": str(tmp), "file": str(tmp / "plain.txt")}
  (tmp / "plain.txt").write_text("not a config, not an archive\n")
  (tmp / "broken_config.py").write_text("def get_config():\n  return 1 / 0\n")
  (tmp / "empty_config.py").write_text("X = 1\n")
  (tmp / "x.safetensors").write_bytes(b"garbage, not a safetensors header")
  rng = np.random.default_rng(0)
  labels = (np.arange(40) % 4).astype(np.int64)
  labels[3] = 999
  np.savez(tmp / "stray.npz", train_images=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), train_labels=labels,
           test_images=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), test_labels=np.arange(8) % 4)
  paths["npz999"] = str(tmp / "stray.npz")
  good = json.dumps({"model": {"name": "small_cnn"}, "seed": 0})
  for name, config_text, checkpoint in (("run_ckpt_only", None, True), ("run_corrupt", '{"model": {"name": ', True),
                                        ("run_no_model", '{"seed": 0}', False), ("run_no_ckpt", good, False)):
    run = tmp / name
    (run / "checkpoints").mkdir(parents=True)
    if checkpoint:
      (run / "checkpoints" / "1").mkdir()
    if config_text is not None:
      (run / "config.json").write_text(config_text)
    paths[name] = str(run)
  return paths


def run_launcher(name: str, argv: list[str], capfd) -> tuple[int, str]:
  """Runs ``launch/NAME.py`` in this process; returns (exit code, stdout + stderr)."""
  path = os.path.join(REPO, "launch", f"{name}.py")
  app.define_help_flags()  # absl's own flags exist before the snapshot, so they are never removed
  before = set(flags.FLAGS._flags())  # pylint: disable=protected-access
  saved_argv, saved_cwd = sys.argv[:], os.getcwd()
  code = 0
  try:
    os.chdir(REPO)
    sys.argv = [path, *argv]
    try:
      runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    sys.argv = saved_argv
    os.chdir(saved_cwd)
    for flag_name in set(flags.FLAGS._flags()) - before:  # pylint: disable=protected-access
      delattr(flags.FLAGS, flag_name)
  out, err = capfd.readouterr()
  return code, out + err


def _ids(case) -> str:
  return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("case_id, launcher, argv, expected", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_is_one_error_line(case_id, launcher, argv, expected, tmp_path, capfd, monkeypatch):
  del case_id
  paths = _make_fixtures(tmp_path)
  argv = [a.format(**paths) for a in argv]
  if "@full_disk" in argv:
    class _Full:
      f_bavail, f_frsize = 10, 4096
    monkeypatch.setattr(io.os, "statvfs", lambda _: _Full())
  if "@read_only" in argv:
    def _read_only(*args, **kwargs):
      raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(io.tempfile, "mkstemp", _read_only)
  argv = [a for a in argv if not a.startswith("@")]
  code, text = run_launcher(launcher, argv, capfd)
  errors = [line for line in text.splitlines() if line.startswith("error:")]
  assert code != 0, text[-2000:]
  assert "Traceback" not in text, text[-3000:]
  assert len(errors) == 1, text[-2000:]
  assert expected in errors[0], errors[0]


def test_table_is_large_enough():
  launchers = {(c.values if hasattr(c, "values") else c)[1] for c in CASES}
  assert len(CASES) >= 60 and launchers == {"train", "explain", "defend", "sweep", "import_weights"}


def test_a_good_command_line_still_parses(tmp_path, capfd):
  """The parser passes a valid command line through to main (here: an analysis of a missing checkpoint)."""
  paths = _make_fixtures(tmp_path)
  code, text = run_launcher("defend", [f"--workdir={paths['run_no_ckpt']}", "--defense=strip",
                                       "--config.strip.num_overlays=5"], capfd)
  assert code == 2 and "has no checkpoint yet" in text  # got past parsing and the config checks into main


def test_cli_helpers():
  from ml_collections import config_dict
  c = config_dict.ConfigDict({"train": {"lr": 0.1, "epochs": 2}, "seed": 0})
  assert cli.unknown_key_message("train.lr", c) is None
  assert cli.unknown_key_message("train", c) is None
  assert "nearest valid key: train.epochs" in cli.unknown_key_message("train.epoch", c)
