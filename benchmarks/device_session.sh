#!/usr/bin/env bash
# One device call, prepared here: continue a training campaign on the GPU, then check that the
# fixed-point network computes the same numbers there as on the CPU (issue 14).
#
# On the CPU first: `vaezip train --campaign NAME --prepare` (builds .carry/ to fit the upload
# and prints what to carry). Then one call of the device tool, from the repository root:
#   command: bash benchmarks/device_session.sh gen2-halo 420
#   carry:   [".carry"] plus runs/NAME.pt and runs/NAME.json where an earlier session left them
#   timeout_s: 600
# It needs only what the device image has (torch, numpy, Pillow, click, rich): the checkout is
# made importable as `vaezip` by links, without installing it. Everything it writes goes to
# $OUT: train.log, NAME.pt, NAME.json (back on the CPU: `vaezip registry add ...
# --only-if-better-than MODEL`), exactness.json, nvidia-smi.txt.
set -uo pipefail
campaign=${1:-gen2-halo}
seconds=${2:-420}
device=${DEVICE:-cuda}  # DEVICE=cpu for a dry run on the CPU
out=${OUT:-/tmp/vaezip-device-out}
mkdir -p "$out" runs /tmp/vaezip-import
ln -sfn ../cli codec/cli
ln -sfn ../models codec/models
ln -sfn "$PWD/codec" /tmp/vaezip-import/vaezip
export PYTHONPATH=/tmp/vaezip-import PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
# a session that overruns its limit (a slow start) still ends with its outputs: SIGTERM 120 s after
# the limit stops `vaezip train` as the limit would (step, evaluation, checkpoint, outputs); SIGKILL 60 s later
timeout -s TERM -k 60 $((seconds + 120)) \
    "$python" -m vaezip.cli.train --campaign "$campaign" --seconds "$seconds" --device "$device" 2>&1 | tee "$out/train.log"
status=${PIPESTATUS[0]}
cp "runs/$campaign.pt" "runs/$campaign.json" "$out/" 2>/dev/null
timeout 90 "$python" benchmarks/device_exactness.py --device "$device" --json-out "$out/exactness.json" \
    > "$out/exactness.log" 2>&1
echo "training exit $status; exactness exit $? (see $out/exactness.json)"
exit "$status"
