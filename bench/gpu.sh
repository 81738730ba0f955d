#!/usr/bin/env bash
# The GPU proof (issue 21): every CUDA path tested and measured in one go, each part under its own time limit.
#   bash bench/gpu.sh                    # on a bare GPU machine: install (CUDA torch, LitGPT peer), then every part
#   GPU_SH_DRY=1 bash bench/gpu.sh       # on a CPU, toy sizes, no install: the same code in seconds (tests/test_gpu_sh.py)
# Results in $OUT (default bench/gpu-results/): gpu.json (every figure, device, torch, CUDA), gpu.md (the summary
# for bench/RESULTS.md), parts/ (each part's figures and status), logs/ (each part's output).
# Budget on one H100/H200 from a bare machine: the sum of the part limits below (600 s) at most; 7.8 minutes on an
# H200 (2026-11-30, offline wheels: bench/RESULTS.md); the peer's install runs beside the CUDA tests, and the
# pretraining part waits for it only when it needs it. Most of pretrain's and decode's time is torch.compile.
# Settings (environment):
#   TORCH                 install.sh's torch spec; default the CUDA 12.8 wheel, then PyPI's (a CUDA build on Linux)
#   GPU_SH_WHEELS         a folder of wheels (default .whl/ when it exists) for a machine without internet whose
#                         python3 already has a torch that sees the GPU (a cloud or cluster image): then, TORCH
#                         unset, .venv and .venv-peers are that python3 with these wheels (what the image lacks:
#                         litdata, jsonargparse, bitsandbytes, litgpt, ... fetched elsewhere with
#                         `pip download --no-deps`) put first on its path, and nothing is downloaded
#   GPU_SH_PARTS          the parts to run, of: install cuda_tests pretrain decode memory packing (default: all)
#   GPU_SH_LIMIT_<PART>   seconds for a part, e.g. GPU_SH_LIMIT_PRETRAIN=300
#   GPU_SH_PEERS=0        no LitGPT column (no .venv-peers install)
#   GPU_SH_FAIL, GPU_SH_HANG   parts that fail / hang on purpose: the tests of this script
# A part that fails or runs out of time is recorded as such and the next one runs; the exit status is 1 when any
# part failed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${OUT:-$ROOT/bench/gpu-results}" && cd "${OUT:-$ROOT/bench/gpu-results}" && pwd)
cd "$ROOT"
DRY=${GPU_SH_DRY:-0}
PY=.venv/bin/python
PEER_PY=.venv-peers/bin/python
CUDA_TORCH_DEFAULT="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_FALLBACK="torch==2.13.0"  # PyPI's Linux wheel: a CUDA build, when the PyTorch index is out of reach
WHEELS=${GPU_SH_WHEELS:-$([[ -d .whl ]] && echo .whl)}

offline_on_system_torch() {  # wheels given, no torch spec asked for, and the machine's python3 has a CUDA torch
  [[ -n $WHEELS && -z ${TORCH:-} ]] && python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null
}

wrap_system_python() {  # DIR: DIR/bin/python is python3 with the wheels (into DIR/site) and the project on its path.
  # Not a venv: python3 may itself be a venv's (a venv made from it would not see its packages), and its own
  # packages (torch, CUDA libraries) stay as they are. Subprocesses (sys.executable) inherit the path.
  mkdir -p "$1/bin" "$1/site"
  local site base
  site=$(cd "$1/site" && pwd)
  base=$(python3 -c "import sys; print(sys.executable)")
  printf '#!/usr/bin/env bash\nPYTHONPATH="%s:%s${PYTHONPATH:+:$PYTHONPATH}" exec "%s" "$@"\n' "$site" "$ROOT" "$base" \
    > "$1/bin/python"
  chmod +x "$1/bin/python"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$WHEELS"/*.whl
}

# Helpers run as their own processes under `timeout` (which signals the whole process group on expiry)
case "${1:-}" in
  _wrap)  # DIR: wrap_system_python alone (tests/test_gpu_sh.py, on a CPU)
    wrap_system_python "$2"; exit $? ;;
  _install)  # the project venv with a CUDA torch, unless it already has one; the spec that worked -> $2
    if $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
      $PY -c "import torch; print('already installed: torch', torch.__version__)"
      echo "torch==$($PY -c "import torch; print(torch.__version__)")" > "$2"
    elif offline_on_system_torch; then
      echo "python3's torch $(python3 -c "import torch; print(torch.__version__)") sees the GPU: .venv is it" \
        "with the wheels of $WHEELS"
      wrap_system_python .venv || exit 1
      echo "torch==$($PY -c "import torch; print(torch.__version__)") (python3's)" > "$2"
    else
      spec=${TORCH:-$CUDA_TORCH_DEFAULT}
      if ! TORCH="$spec" bash install.sh; then
        echo "install.sh with TORCH='$spec' failed; trying '$TORCH_FALLBACK' (PyPI)"
        spec=$TORCH_FALLBACK
        TORCH="$spec" bash install.sh || exit 1
      fi
      echo "$spec" > "$2"
    fi
    # pytest only: the test extra's references (transformers, lm-eval, ...) are not needed by tests/test_cuda.py
    $PY -c "import pytest" 2>/dev/null || $PY -m pip install -q -c .venv/torch-constraint.txt pytest || exit 1
    $PY -c "import torch, lightning, litdata, jsonargparse, bitsandbytes
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())" || exit 1
    exit 0 ;;
  _peers)  # LitGPT in .venv-peers with the same torch build (BENCH.md); a failure only empties the LitGPT column
    if $PEER_PY -c "import litgpt, torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
      echo "already installed: $($PEER_PY -m pip list 2>/dev/null | grep -i '^litgpt ')"; exit 0
    fi
    if offline_on_system_torch; then  # as _install
      wrap_system_python .venv-peers || exit 1
      $PEER_PY -c "import litgpt, torch; print('peer ready: litgpt, torch', torch.__version__, torch.cuda.is_available())"
      exit $?
    fi
    spec=$(cat "$2" 2>/dev/null || echo "$CUDA_TORCH_DEFAULT")
    python3 -m venv .venv-peers || exit 1
    $PEER_PY -m pip install -q --upgrade pip
    $PEER_PY -m pip install -q $spec || $PEER_PY -m pip install -q $TORCH_FALLBACK || exit 1
    echo "torch==$($PEER_PY -c "import torch; print(torch.__version__.split('+')[0])")" > .venv-peers/torch-constraint.txt
    $PEER_PY -m pip install -q -c .venv-peers/torch-constraint.txt litgpt safetensors pyyaml || exit 1
    $PEER_PY -c "import litgpt, torch; print('peer ready: litgpt, torch', torch.__version__, torch.cuda.is_available())"
    exit $? ;;
esac

mkdir -p "$OUT/parts" "$OUT/logs"
rm -f "$OUT"/parts/* "$OUT"/logs/* "$OUT/gpu.json" "$OUT/gpu.md" "$OUT/cuda-tests.xml"
PARTS=${GPU_SH_PARTS:-install cuda_tests pretrain decode memory packing}
start_all=$SECONDS
failed=0

wanted() { [[ " $PARTS " == *" $1 "* ]]; }

status() {  # part rc seconds limit [skipped-reason]
  printf '{"rc": %d, "seconds": %d, "limit_s": %d%s}\n' "$2" "$3" "$4" "${5:+, \"skipped\": \"$5\"}" \
    > "$OUT/parts/$1.status"
}

run_part() {  # name default-limit command...: the command's output to logs/NAME.log, its status to parts/NAME.status
  local name=$1 limit=$2 var="GPU_SH_LIMIT_${1^^}" start=$SECONDS rc
  shift 2
  # the limits fit a GPU; the dry run's CPU work on a busy 2-core machine takes longer, so it gets 4x (not an explicit one)
  [[ $DRY == 1 ]] && limit=$((limit * 4))
  limit=${!var:-$limit}
  wanted "$name" || return 0
  echo "== $name (limit ${limit} s) $(date +%T)"
  timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  status "$name" "$rc" $((SECONDS - start)) "$limit"
  case $rc in
    0) echo "   ok in $((SECONDS - start)) s" ;;
    124|137) echo "   TIMED OUT after $limit s (logs/$name.log)"; failed=1 ;;
    *) echo "   FAILED, exit $rc: $(grep -v '^\s*$' "$OUT/logs/$name.log" | tail -n 1)"; failed=1 ;;
  esac
}

# Install: the project venv first (everything needs it), then the peer's in the background during the CUDA tests
if [[ $DRY == 1 ]]; then
  wanted install && status install 0 0 0 "dry run: the existing .venv"
  GPU_SH_PEERS=${GPU_SH_PEERS:-0}  # the dry run leaves out the peer unless asked: it must take seconds
else
  run_part install 90 bash "$0" _install "$OUT/logs/torch-spec.txt"
  if ! $PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "!! CUDA is not available to torch in .venv: every part will fail (see logs/install.log, nvidia-smi)"
    nvidia-smi 2>&1 | head -n 15
  fi
fi
export GPU_SH_PEERS=${GPU_SH_PEERS:-1}
# gpu_bench.py's peer runs wait for this file (the install's exit status) before they look for .venv-peers
export GPU_SH_PEERS_DONE=$OUT/logs/peers_install.rc
if [[ $GPU_SH_PEERS == 1 && $DRY != 1 ]] && { wanted pretrain || wanted decode; }; then
  ( timeout -k 10 "${GPU_SH_LIMIT_PEERS:-240}" bash "$0" _peers "$OUT/logs/torch-spec.txt" \
      > "$OUT/logs/peers_install.log" 2>&1; echo $? > "$GPU_SH_PEERS_DONE" ) &
else
  echo 0 > "$GPU_SH_PEERS_DONE"
fi

# 1. the CUDA tests; outside a dry run a missing GPU fails them instead of skipping them
export GPU_SH_REQUIRE_CUDA=$([[ $DRY == 1 ]] && echo 0 || echo 1)
run_part cuda_tests 75 $PY -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -rs \
  --junitxml="$OUT/cuda-tests.xml"

# 2-5. the measurements (bench/gpu_bench.py); each writes parts/PART.json as it goes
run_part pretrain 215 $PY bench/gpu_bench.py pretrain --out "$OUT"
run_part decode 150 $PY bench/gpu_bench.py decode --out "$OUT"
run_part memory 40 $PY bench/gpu_bench.py memory --out "$OUT"
run_part packing 30 $PY bench/gpu_bench.py packing --out "$OUT"

echo "== report ($((SECONDS - start_all)) s in all)"
timeout 60 $PY bench/gpu_bench.py report --out "$OUT" > "$OUT/logs/report.log" 2>&1 || {
  echo "report failed:"; tail -n 20 "$OUT/logs/report.log"; exit 1; }
cat "$OUT/gpu.md"
echo "written: $OUT/gpu.json, $OUT/gpu.md"
exit $failed
