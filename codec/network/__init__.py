"""The density model: its config, the hierarchical VAE, how coding runs it (numerics), the registry of weights (torch)."""
