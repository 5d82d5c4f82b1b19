"""Training: state, optimisers, jitted steps, mesh placement, checkpoints, the loop."""
