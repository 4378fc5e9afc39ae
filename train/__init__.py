"""Training: data, the training loop, checkpoints, kept weights, atomic files and locks, the stop request."""
