r"""Single-stage explanation backdoor: the two-stage losses, trained from scratch.

No reference model exists from scratch, so the keep-clean term cannot compare with a
stage-1 map; instead it penalises the mass clean maps put inside the target region
(``explain.keep='avoid_target'``). The map terms start after the model has learned
something only implicitly: they are on from step 0 (use the two-stage recipe if they
should start from a trained model).

  python launch/train.py --config=configs/single_stage.py --workdir=runs/single_stage_digits
"""
from backdoor_jax.configs.two_stage import single_stage as get_config  # noqa: F401
