"""The project's configs as importable builders (ml_collections), shipped with the library.

Each recipe's ``get_config(variant)`` lives here; the files in ``configs/`` are thin launch
files (``--config=configs/badnets.py:VARIANT``) that re-export them with the docstring and
launch commands. Import a builder to derive a config in Python, with no ``sys.path``
edits::

  from backdoor_jax.configs import badnets
  c = badnets.get_config("digits_wanet")
"""
