"""Training: self-distillation cache, teacher cache, the sharded train step, checkpoints, the loop."""
