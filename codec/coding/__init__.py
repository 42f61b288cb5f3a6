"""Coding images with the network: tiles, quantised pixel distributions, scale calibration, bits-back, and image-level coding (torch)."""
