"""The prepared GPU run: ``prepare.sh`` here, then ``run.sh OUT`` on the lent machine (see run.py)."""
