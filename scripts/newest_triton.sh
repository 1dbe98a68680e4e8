#!/usr/bin/env bash
# The triton tests under the newest triton and numpy that pip installs, next to the pinned ones.
#
# The project's venv pins triton 3.6 (what the GPU machines run) and numpy < 2.4; a user who runs
# `pip install triton numpy` today gets newer ones. This installs the newest two into a small side directory
# (--target, about 600 MB, reused between runs) that is put before the venv's own packages on PYTHONPATH, so the
# venv's torch and the editable fusedsae are shared and nothing else is downloaded. Then it runs the triton tests.
#
#   scripts/newest_triton.sh [pytest args...]     (default: tests/test_triton.py tests/test_hopper_kernels.py)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$root/.venv}"
side="${NEWEST_TRITON_DIR:-$root/.venv-newest-triton}"
vpy="$venv/bin/python"

"$vpy" -m pip install --quiet --upgrade --target "$side" triton numpy
versions=$(PYTHONPATH="$side" "$vpy" -c "import numpy, triton; print(f'triton {triton.__version__}, numpy {numpy.__version__}')")
echo "newest: $versions"
if [ "$#" -eq 0 ]; then
  set -- tests/test_triton.py tests/test_hopper_kernels.py
fi
cd "$root"
PYTHONPATH="$side${PYTHONPATH:+:$PYTHONPATH}" exec "$vpy" -m pytest -q -p no:cacheprovider "$@"
