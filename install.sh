#!/usr/bin/env bash
# Set up .venv with the project: `bash install.sh` (runtime) or `bash install.sh test` (+ test extra).
# TORCH picks the torch build; the default is the CPU build 2.13.0. On a GPU machine, e.g.:
#   TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash install.sh
set -euo pipefail
cd "$(dirname "$0")"
extra=${1:-}
TORCH=${TORCH:-torch==2.13.0}
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and then pinned by a constraint, so no dependency (litdata -> torchvision) can swap the build
.venv/bin/python -m pip install -q $TORCH
torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)
echo "torch==$torch_version" > .venv/torch-constraint.txt
.venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e ".${extra:+[$extra]}"
# litdata pulls a torchvision whose C++ ops do not match this torch and break `import lightning`
# ("operator torchvision::nms does not exist"); litdata needs torchvision only for images.
.venv/bin/python -m pip uninstall -q -y torchvision 2>/dev/null || true
.venv/bin/python -c "import torch, lightning, litdata; print(f'ready: torch {torch.__version__}, lightning {lightning.__version__}')"
