"""Training: the loop, LR schedules, atomic checkpoints and logs."""
