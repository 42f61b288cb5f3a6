"""Entropy coding on one ANS stack: push/pop primitives and streams of steps, the plane coder, the low bits of 16-bit samples (no torch)."""
