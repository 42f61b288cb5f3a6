"""The byte-level file formats: the version table, .vz files, .vzp archives (no torch)."""
