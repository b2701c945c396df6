"""Training: optimizer, schedule and (next) the DeepSpeed trainers."""
