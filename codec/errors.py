"""Typed errors: everything vaezip raises on purpose is a `VaezipError`."""


class VaezipError(Exception):
    """Base class; the CLI prints its message as one line and exits non-zero."""


class UnsupportedImageError(VaezipError):
    """The input image has a mode or layout vaezip does not code losslessly."""


class InputError(VaezipError):
    """An input file is missing, unreadable or not an image."""


class CorruptFileError(VaezipError):
    """A .vz / .vzp file is truncated, damaged or not a vaezip file at all."""


class UnsupportedVersionError(CorruptFileError):
    """The file was written by a format version this build does not know."""


class ModelError(VaezipError):
    """A model name is unknown, or its weights are missing or fail the hash check."""


class DecodeMismatchError(VaezipError):
    """Decoded pixels fail the stored checksum: never returned as an image."""


class OutputExistsError(VaezipError):
    """Refusing to overwrite an existing file without --force."""
