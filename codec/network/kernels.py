"""oneDNN's instruction-set cap: kept where float networks code, lifted where every number is exact.

Format versions 2 to 5 run a float network whose convolutions sum in the order of the oneDNN
kernels its JIT picks for the CPU. Capped at AVX2 (`CAP`), every x86-64 CPU with AVX2 runs the
same kernels, so those files move between such CPUs (docs/PORTABILITY.md); `import vaezip`
sets the cap (`set_cap`) unless the environment names a level. The fixed-point formats (6 on)
give the same bits on every kernel, so a process that codes nothing else may lift the cap
(`lift_cap`): on an AVX-512 CPU oneDNN's convolutions then take about 0.6x the time.
oneDNN reads the variable once, at its first convolution. Torch-free.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable

from vaezip.errors import UnsupportedVersionError
from vaezip.format import versions

VARIABLE = "ONEDNN_MAX_CPU_ISA"
CAP = "AVX2"
UNCAPPED = "DEFAULT"
"""oneDNN's value for no restriction (ISAs it supports only in preview stay off)."""

MARK = "VAEZIP_ONEDNN_CAP"
"""Set beside `VARIABLE` to the same level by `set_cap`: a process that inherits both (a command
run from a program that imported vaezip) knows the level is vaezip's default, not the user's."""

_capped_here = False


def set_cap() -> None:
    """Cap oneDNN at AVX2, unless the environment names a level of its own (the user's choice,
    or a cap a parent process lifted for this one)."""
    global _capped_here
    if VARIABLE not in os.environ or os.environ[VARIABLE] == os.environ.get(MARK):
        os.environ[VARIABLE] = os.environ[MARK] = CAP
        _capped_here = True


def lift_cap() -> bool:
    """Let oneDNN use the CPU's widest kernels in this process and the ones it starts.

    Only for a process that codes fixed-point formats alone (`exact_only`); the command line
    calls it once it knows the formats. Does nothing where the environment, not vaezip, set
    the level, or where torch is already imported (it may have run a convolution, which read
    the cap). Returns whether the cap was lifted."""
    global _capped_here
    if not _capped_here or "torch" in sys.modules:
        return False
    os.environ[VARIABLE] = UNCAPPED
    del os.environ[MARK]
    _capped_here = False
    return True


def exact_only(format_versions: Iterable[int]) -> bool:
    """True when every one of `format_versions` runs a fixed-point network, so that no kernel
    choice can change its numbers; False for a version this build does not know (or None)."""
    try:
        return all(versions.get(v).numerics.exact for v in format_versions)
    except UnsupportedVersionError:  # the decoder reports it; the cap stays
        return False
