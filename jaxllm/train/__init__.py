"""Training: state, optimizer, jitted sharded step, checkpoints, metrics and the loop."""
