#!/bin/sh
# An emulated arm64 Debian root for `benchmarks/portability.py --aarch64-root ROOT`
# (docs/portability-aarch64.md). Needs root and the Debian mirror and PyPI; about 15 minutes.
#
#   sh benchmarks/aarch64_root.sh /work/arm64-root [WHEELS]     # set up, or mount again after a reboot
#   umount ROOT/sys ROOT/proc ROOT/tmp ROOT/work                # when done
#
# The root sees /work and /tmp at the same paths (bind mounts), so the benchmark's snapshot
# of the code (on PYTHONPATH under /tmp) and its files are the same inside and outside.
# constriction has no aarch64 Linux wheel on PyPI: the benchmark sends the root's coder calls
# to this machine's constriction (benchmarks/constriction_rpc/).
set -eu
ROOT=${1:?usage: aarch64_root.sh ROOT [WHEELS]}
WHEELS=${2:-$(dirname "$ROOT")/arm64-wheels}
PY=/work/wt-port/.venv/bin/python
[ -x "$PY" ] || PY=python3

if [ ! -x "$ROOT/opt/venv/bin/python" ]; then
    apt-get install -y -q qemu-user-static debootstrap binfmt-support
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    update-binfmts --enable qemu-aarch64
    debootstrap --arch=arm64 --foreign --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOT" http://deb.debian.org/debian
    cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
    chroot "$ROOT" /debootstrap/debootstrap --second-stage
    chroot "$ROOT" /usr/bin/python3 -m venv /opt/venv
    # Downloaded on the host (fast) for the root's Python 3.11. torch 2.9.1: PyPI's aarch64
    # wheel is CPU-only (2.13.0's needs CUDA 13 packages); mpmath < 1.4 for sympy.
    "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
        --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --python-version 3.11 \
        --implementation cp --abi cp311 --abi abi3 --abi none -d "$WHEELS" torch==2.9.1 numpy==2.4.6 \
        pillow==13.0.0 click==8.5.1 imagecodecs==2026.3.6 tifffile==2026.3.3 filelock typing_extensions \
        sympy networkx jinja2 fsspec mpmath==1.3.0 markupsafe
fi
for d in work tmp; do
    mkdir -p "$ROOT/$d"
    mountpoint -q "$ROOT/$d" || mount --bind "/$d" "$ROOT/$d"
done
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/sys" || mount --bind /sys "$ROOT/sys"
chroot "$ROOT" /opt/venv/bin/python -c "import torch" 2>/dev/null || \
    chroot "$ROOT" /opt/venv/bin/pip install -q --no-index --find-links "$WHEELS" torch==2.9.1 numpy==2.4.6 \
        pillow==13.0.0 click==8.5.1 imagecodecs==2026.3.6 tifffile==2026.3.3
chroot "$ROOT" /opt/venv/bin/python -c "import platform, torch, numpy; print(platform.machine(), torch.__version__, numpy.__version__)"
