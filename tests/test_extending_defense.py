"""docs/extending.md, "A new defense": a defense defined OUTSIDE the library, run through defend_run.

Also: the defense defaults ship inside the package, so ``defenses.default_config()``
and ``launch/defend.py`` work from a plain (non-editable) install, run from another folder.
"""
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from backdoor_jax import defenses
from backdoor_jax.defenses import common, registry
from backdoor_jax.errors import ConfigError
from tests.helpers import REPO, tiny_config


# ---- the worked example of docs/extending.md (kept identical) ----
def squeeze(x, bits):
  """Pixel-unit images (0..255) reduced to ``bits`` bits per channel."""
  levels = 2 ** bits - 1
  return jnp.round(x / 255.0 * levels) / levels * 255.0


def bit_depth_run(ctx, out_dir):
  """Feature squeezing: the model on ``bits``-bit inputs (a defense that transforms the input)."""
  bits = ctx.config.bit_depth.bits
  if not isinstance(bits, int) or not 1 <= bits <= 8:
    raise ConfigError(f"bit_depth.bits={bits!r} is invalid; allowed: an int in [1, 8]")
  after = common.evaluate(ctx, ctx.variables, transform=lambda x: squeeze(x, bits), name=f"bits{bits}")
  return {"bits": bits, "after": after}


def bit_depth_summary(rec):
  return {"verdict": f"inputs squeezed to {rec['bits']} bits", "after": rec["after"]}


def bit_depth_defaults():
  return config_dict.ConfigDict({"bits": 3})
# ---- end of the worked example ----


@pytest.fixture(scope="module", autouse=True)
def registered():
  registry.register(registry.Defense("bit_depth", bit_depth_run, bit_depth_summary, defaults=bit_depth_defaults))
  yield
  registry.unregister("bit_depth")


def _train(config, workdir):
  from backdoor_jax.train import recipes
  return recipes.run(config, workdir)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("extend_defense") / "bd")
  _train(tiny_config(**{"data.max_train": 200, "data.max_test": 60, "train.epochs": 1}), d)
  return d


def _small(config):
  config.val_size, config.max_test = 20, 40
  return config


def test_squeeze_known_values():
  x = jnp.array([0.0, 60.0, 127.0, 128.0, 200.0, 255.0])
  np.testing.assert_array_equal(squeeze(x, 1), [0, 0, 0, 255, 255, 255])
  np.testing.assert_allclose(squeeze(x, 8), x, atol=1e-4)


def test_user_defense_end_to_end(run_dir):
  base = _small(defenses.default_config())
  assert "bit_depth" not in base  # the section comes from the defense's own defaults
  ctx = common.load_context(run_dir, base)  # loaded once, shared by the calls below
  rec = defenses.defend_run(run_dir, "bit_depth", base, ctx=ctx)
  assert "bit_depth" not in base  # the caller's config is left alone
  on_disk = json.load(open(os.path.join(run_dir, "defenses", "bit_depth", "report.json")))
  assert on_disk == json.loads(json.dumps(rec))
  assert rec["defense"] == "bit_depth" and rec["settings"] == {"bits": 3} and rec["run"]["num_test"] == 40
  assert 0 <= rec["after"]["clean_accuracy"] <= 1 and 0 <= rec["after"]["attack_success_rate"] <= 1
  row = defenses.report.summary_row(rec)
  assert row["verdict"] == "inputs squeezed to 3 bits"
  assert row["clean_accuracy_after"] == rec["after"]["clean_accuracy"]
  assert row["attack_success_rate_before"] == rec["before"]["attack_success_rate"]
  # 8 bits changes no pixel: the defended model is the undefended one
  c8 = _small(defenses.default_config())
  c8.bit_depth = config_dict.ConfigDict({"bits": 8})
  rec8 = defenses.defend_run(run_dir, "bit_depth", c8, ctx=ctx)
  assert rec8["after"] == rec8["before"]
  # defend_all puts its row in the summary (and runs every registered defense when names is None)
  summary = defenses.defend_all(run_dir, c8, names=("bit_depth",))
  assert [r["defense"] for r in summary["rows"]] == ["bit_depth"]
  assert "| bit_depth | inputs squeezed to 8 bits |" in open(os.path.join(run_dir, "defenses", "summary.md")).read()
  c0 = _small(defenses.default_config())
  c0.bit_depth = config_dict.ConfigDict({"bits": 0})
  with pytest.raises(ConfigError, match=r"bit_depth.bits=0 is invalid"):
    defenses.defend_run(run_dir, "bit_depth", c0, ctx=ctx)


def test_registry_refusals():
  with pytest.raises(ConfigError, match="already registered"):
    registry.register(registry.Defense("bit_depth", bit_depth_run, bit_depth_summary))
  with pytest.raises(ConfigError, match="'all' is reserved"):
    registry.register(registry.Defense("all", bit_depth_run, bit_depth_summary))
  registry.register(registry.Defense("no_section", bit_depth_run, bit_depth_summary))
  try:
    with pytest.raises(ConfigError, match="no section 'no_section' for defense 'no_section'"):
      registry.with_sections(defenses.default_config(), ["no_section"])
  finally:
    registry.unregister("no_section")
  with pytest.raises(ConfigError, match=r"unknown defense 'nope'; allowed: neural_cleanse.*bit_depth"):
    defenses.defend_run("unused", "nope")


def test_non_editable_install_from_another_folder(tmp_path):
  """``pip install`` (no -e) into a folder; the defaults come from the installed package."""
  src, target, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
  elsewhere.mkdir()
  # a copy of what `pip install .` reads, so the build leaves no build/ folder in the checkout
  shutil.copytree(os.path.join(REPO, "backdoor_jax"), src / "backdoor_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for f in ("setup.py", "README.md"):
    shutil.copy(os.path.join(REPO, f), src / f)
  pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, text=True,
                       timeout=300)
  if pip.returncode:
    pytest.skip(f"pip cannot build the package offline here: {pip.stderr.strip().splitlines()[-1:]}")
  env = dict(os.environ, PYTHONPATH=str(target))
  script = ("import backdoor_jax, json; from backdoor_jax import defenses\n"
            "print(backdoor_jax.__file__); print(defenses.default_config().to_json())")
  r = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  where, settings = r.stdout.strip().splitlines()[-2:]
  assert where.startswith(str(target)), where
  assert json.loads(settings) == json.loads(defenses.default_config().to_json())
  # the launcher, run from elsewhere, imports the installed package (one error: line for a bad name)
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch", "defend.py"), f"--workdir={elsewhere}",
                      "--defense=nope"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith("error: unknown defense 'nope'; allowed: neural_cleanse")
