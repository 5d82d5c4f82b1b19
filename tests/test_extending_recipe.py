"""docs/extending.md, "A new recipe": a recipe defined outside the library, registered, run end to end."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import optax

from backdoor_jax import evaluate, experiment
from backdoor_jax.train import engine, feed, optim, recipes, steps
from backdoor_jax.train import mesh as mesh_lib
from backdoor_jax.train import state as state_lib
from backdoor_jax.train.recipes import badnets
from tests.helpers import apply_overrides, tiny_config


# --- the worked example, as a user would write it in their own file -------------------------
def make_smoothed_step(spec, base_key, smoothing):
  """A BadNets step whose cross-entropy uses label smoothing."""

  def step(state, images, labels):
    x = steps.preprocess(jax.random.fold_in(base_key, state.step), images, spec)

    def loss_fn(params):
      logits, upd = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                   mutable=["batch_stats"])
      target = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
      return optax.softmax_cross_entropy(logits.astype(jnp.float32), target).mean(), (logits, upd["batch_stats"])
    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    n = labels.shape[0]
    return state.apply_gradients(grads, stats), {
        "loss_sum": loss * n, "correct": jnp.sum(jnp.argmax(logits, -1) == labels), "count": jnp.asarray(n)}
  return jax.jit(step, donate_argnums=(0,))


def train_smoothed(config, workdir):
  c = config
  exp = experiment.build_experiment(c)                        # data, trigger, poisoned sets
  mesh = mesh_lib.make_mesh()
  batches = feed.ArrayFeed(feed.process_data(exp.train_images, exp.train_labels), mesh, c.train.batch_size, c.seed)
  keys = experiment.run_keys(c.seed)
  spec, variables = badnets.initial_variables(exp, keys["init"])
  tx, _ = optim.make_optimizer(c.train, batches.steps_per_epoch, variables["params"])
  state = mesh_lib.replicate(mesh, state_lib.create_train_state(exp.model, tx, None, None, variables=variables))
  eval_step = steps.make_eval_step(spec, exp.model.apply)

  def metrics(state):
    clean = evaluate.evaluate_classifier(eval_step, state.variables, exp.dataset.test_images,
                                         exp.dataset.test_labels, c.train.eval_batch_size, mesh)
    attack = evaluate.evaluate_classifier(eval_step, state.variables, exp.test_triggered, exp.test_attack_labels,
                                          c.train.eval_batch_size, mesh)
    return badnets.classifier_metrics(exp, clean, attack)

  task = engine.Task(state=state, step=make_smoothed_step(spec, keys["step"], c.smoothing), feed=batches,
                     evaluate=metrics, finish=lambda state, history: metrics(state),
                     meta=experiment.run_facts(exp))
  return engine.fit(task, engine.RunSpec.from_config(c, workdir))[1]


recipes.register("badnets_smoothed", train_smoothed, ("clean_accuracy", "attack_success_rate"))
# --------------------------------------------------------------------------------------------


def _config(smoothing):
  c = tiny_config(**{"train.epochs": 1, "data.max_train": 128})
  with c.unlocked():
    c.recipe = "badnets_smoothed"
    c.smoothing = smoothing
  return c


def test_registered_recipe_runs_end_to_end_and_resumes(tmp_path):
  res = recipes.run(_config(0.1), str(tmp_path))
  assert 0 <= res["clean_accuracy"] <= 1 and 0 <= res["attack_success_rate"] <= 1
  assert (tmp_path / "checkpoints" / "1").exists() and (tmp_path / "results.json").exists()
  assert json.loads((tmp_path / "config.json").read_text())["recipe"] == "badnets_smoothed"
  # a longer rerun resumes from epoch 1 (the engine's resume applies to every recipe)
  res2 = recipes.run(apply_overrides(_config(0.1), **{"train.epochs": 2}), str(tmp_path))
  hist = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [h["epoch"] for h in hist] == [1, 2] and res2["epochs"] == 2


def test_without_smoothing_it_is_the_badnets_recipe(tmp_path):
  """Known answer: smoothing 0 trains exactly what the built-in recipe trains."""
  recipes.run(_config(0.0), str(tmp_path / "mine"))
  c = tiny_config(**{"train.epochs": 1, "data.max_train": 128})
  badnets.train(c, str(tmp_path / "builtin"))
  mine = json.loads((tmp_path / "mine" / "metrics.jsonl").read_text())
  builtin = json.loads((tmp_path / "builtin" / "metrics.jsonl").read_text())
  assert abs(mine["train_loss"] - builtin["train_loss"]) < 1e-5, (mine["train_loss"], builtin["train_loss"])
  assert mine["clean_accuracy"] == builtin["clean_accuracy"]
