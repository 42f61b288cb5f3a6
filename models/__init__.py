"""Model weights shipped as package data; see vaezip.network.registry."""
