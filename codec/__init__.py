"""vaezip: lossless image compression with a hierarchical VAE and bits-back ANS coding.

The public API is imported lazily so that `import vaezip` (and `vaezip --help`)
does not pay for importing torch.
"""

from __future__ import annotations

import os as _os

# Format versions 2 to 5 sum convolutions with the oneDNN kernels its JIT picks for the
# CPU. Capped at AVX2 (read once, at torch's first convolution), every x86-64 CPU with
# AVX2 runs the same kernels, so files move between them (docs/PORTABILITY.md).
_os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

__version__ = "0.1.0"

_API = {"compress", "decompress", "decompress_image", "decompress_pil", "measure", "load_model", "Report", "pack", "unpack"}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        from vaezip import api

        return getattr(api, name)
    if name in {"VaezipError"}:
        from vaezip import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'vaezip' has no attribute {name!r}")
