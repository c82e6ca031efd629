"""Training engine: the loop, optimisation, evaluation, checkpoints, projection, process context."""
