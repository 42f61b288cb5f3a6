"""vaezip: lossless image compression with a hierarchical VAE and bits-back ANS coding.

The public API is imported lazily so that `import vaezip` (and `vaezip --help`)
does not pay for importing torch.
"""

from __future__ import annotations

from vaezip.network import kernels as _kernels

# oneDNN capped at AVX2 before torch's first convolution: the float-network formats (2 to 5)
# then decode on every AVX2 CPU; the command line lifts it for exact formats (`kernels`).
_kernels.set_cap()

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
