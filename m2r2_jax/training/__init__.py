"""Training: prompt sets, self-distillation cache."""
