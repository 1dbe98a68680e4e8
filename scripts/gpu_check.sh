#!/usr/bin/env bash
# The one-shot GPU check (`make gpu-check`): on a fresh H100/H200 machine (python3 with torch, triton, nvcc; no
# network; nothing of ours installed), in at most 9 minutes, from the repository root:
#
#   scripts/gpu_check.sh           # install, GPU tests, CUDA graph, encoder configs, benchmark rows bf16, fp32
#   scripts/gpu_check.sh --dry     # the same script on the CPU: Triton's interpreter, tiny shapes (CI runs this)
#
# Steps run in the order of what each can falsify (nothing runs without the install; wrong results make every
# timing moot; then the headline ratios), each under `timeout` so a kill still leaves a report. The report is
# benchmarks/results/gpu-check-<device>-<commit>.{json,md} (dry: $WORK), rewritten after every step and copied
# to $OUT when set. Settings: PYTHON, WORK (logs, default build/gpu-check), GPU_CHECK_S (total seconds, 540),
# WHEELS (a folder of wheels for the peers sparsify and SAELens and their missing dependencies, installed offline),
# FUSEDSAE_COMMIT (the commit, for a copy of the tree without .git).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry) DRY=1 ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --dry, or nothing)" >&2; exit 2 ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ $DRY == 1 && -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
WORK=${WORK:-build/gpu-check}
TOTAL=${GPU_CHECK_S:-540}
[[ $DRY == 1 ]] && TOTAL=${GPU_CHECK_S:-900}
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
rm -rf "$WORK" && mkdir -p "$WORK"
T0=$(date +%s)
FAILED=0

elapsed() { echo $(($(date +%s) - T0)); }
left() { echo $((TOTAL - $(elapsed))); }

# step NAME SECONDS CMD...: runs CMD under timeout (at most the time left, less 15 s for the report), logs it to
# $WORK/NAME.log and records its exit status, duration and last lines in results.jsonl.
step() {
  local name=$1 limit=$2
  shift 2
  local avail=$(($(left) - 15))
  ((limit > avail)) && limit=$avail
  if ((limit < 5)); then
    echo "[$(elapsed)s] $name: skipped, $(left) s left"
    record "$name" skipped 0
    return
  fi
  echo "[$(elapsed)s] $name (up to ${limit}s)"
  local start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  ((rc == 124 || rc == 137)) && echo "[$(elapsed)s] $name: timed out after ${limit}s"
  ((rc != 0)) && FAILED=1
  tail -n 5 "$WORK/$name.log" | cut -c1-300
  record "$name" "$rc" $(($(date +%s) - start))
}

record() {
  "$PYTHON" - "$WORK" "$1" "$2" "$3" <<'EOF' || true
import json, sys
from pathlib import Path
work, name, rc, seconds = sys.argv[1:5]
log = Path(work) / f"{name}.log"
tail = "\n".join(log.read_text(errors="replace").splitlines()[-6:]) if log.exists() else ""
with open(Path(work) / "results.jsonl", "a") as f:
    f.write(json.dumps({"kind": "step", "name": name, "rc": rc, "seconds": int(seconds), "tail": tail}) + "\n")
EOF
}

DRIVER=("$PYTHON" scripts/gpu_check.py --work "$WORK")

# 0. the machine: what the results will be read against
step env 20 bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'; nvcc --version 2>/dev/null | tail -1 || echo 'no nvcc';
  $PYTHON -c 'import sys, torch, triton, numpy; print(sys.version.split()[0], torch.__version__, triton.__version__, numpy.__version__, torch.cuda.is_available())'"

# 1. install, no deps, no network; the CUDA extension for sm_90 only (half the nvcc time); the dry run skips nvcc
if [[ $DRY == 1 ]]; then
  step install 120 env FUSEDSAE_CUDA=0 "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
else
  step install 150 env FUSEDSAE_CUDA_ARCHS=90 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
fi
# peers to compare with (sparsify, SAELens), when their wheels were carried along: WHEELS=dir, no network needed
if [[ -n "${WHEELS:-}" ]]; then
  step peers 60 "$PYTHON" -m pip install --no-index --find-links "$WHEELS" eai-sparsify sae-lens
fi
step backends 20 "$PYTHON" -c "import fusedsae.backends as b; [print(k, v['available'], v['reason'][:200]) for k, v in b.report().items()]"

# 2. correctness on the compiled kernels, 8 workers compiling in parallel: the GPU test files, then the tests
#    marked gpu elsewhere. The dry run selects only the gpu-marked ones (they skip): it checks the plumbing.
GPU_FILES=(tests/test_cuda.py tests/test_triton.py)
[[ -f tests/test_sync.py ]] && GPU_FILES+=(tests/test_sync.py)
IGNORE=()
for f in "${GPU_FILES[@]}"; do IGNORE+=(--ignore "$f"); done
PYTEST=(-m pytest -q -p no:cacheprovider -rfE --maxfail 40)
if [[ $DRY == 1 ]]; then
  step tests 90 "$PYTHON" "${PYTEST[@]}" -n 2 -m gpu "${GPU_FILES[@]}"
else
  "$PYTHON" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 120)
  step tests 120 "$PYTHON" "${PYTEST[@]}" -n 8 "${GPU_FILES[@]}"
  step tests-gpu-marked 40 "$PYTHON" "${PYTEST[@]}" -n 8 -m gpu tests "${IGNORE[@]}"
fi

DRYARG=()
[[ $DRY == 1 ]] && DRYARG=(--dry)

# 3. the training step captured in a CUDA graph and replayed, vs eager: a sync anywhere in the step fails the
#    capture (own process: a failed capture can leave the CUDA context unusable). It also compiles the 768-wide
#    kernels the benchmark rows then reuse.
step graph 100 "${DRIVER[@]}" "${DRYARG[@]}" --sections graph --dtype bfloat16 --budget 85

# 4. the triton encoder's candidate configurations side by side
step configs 50 "${DRIVER[@]}" "${DRYARG[@]}" --sections configs --dtype bfloat16 --budget 40

# 5. the benchmark rows at both DESIGN shapes in bf16 (the dry run: one tiny shape), each shape an equal share of
#    what is left (at least ~90 s when every step before ran to its limit, ~210 s typically)
BENCH_S=$(($(left) - 45))
((DRY == 1)) && BENCH_S=300 # every row must run in the dry run (~40 s of CPU), however busy the machine
step bench-bf16 $((BENCH_S + 25)) "${DRIVER[@]}" "${DRYARG[@]}" --sections bench --dtype bfloat16 --budget "$BENCH_S"

# 6. fp32 with whatever time is left (not in the dry run: the same code at another dtype)
if [[ $DRY == 0 ]] && (($(left) > 60)); then
  step bench-fp32 $(($(left) - 15)) "${DRIVER[@]}" --sections bench --dtype float32 --budget $(($(left) - 35))
fi

"${DRIVER[@]}" "${DRYARG[@]}" --render-only | tail -2
[[ -n "${OUT:-}" ]] && cp "$WORK"/*.log "$OUT"/ 2>/dev/null
echo "[$(elapsed)s] gpu check done$([[ $FAILED == 1 ]] && echo ', with failed or timed-out steps (see the report)')"
exit $FAILED
