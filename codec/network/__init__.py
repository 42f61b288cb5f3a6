"""The density model: its config, the hierarchical VAE, how coding runs it (numerics, the oneDNN
instruction-set cap), the registry of weights (torch)."""
