"""Images as vaezip keeps them: modes and sample depths, reading every input file at its real depth, writing PNG (no torch)."""
