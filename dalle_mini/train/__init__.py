"""Training: the synthetic scene world the embedded models learn from, its checker, the trainers."""
