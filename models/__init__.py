"""Model weights shipped as package data; see vaezip.registry."""
