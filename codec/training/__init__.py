"""Training models: data sets and crop samplers, the training loop, pruning collapsed latents (torch)."""
