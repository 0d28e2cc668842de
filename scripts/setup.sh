#!/usr/bin/env bash
# Create .venv and install rnngrad with its test tools, Ray (the [ray] extra, for
# `rnngrad sweep` and its test) and neurogym (the [neuro] extra, for --task neurogym:ID).
# torch: an existing torch in the venv (CUDA or CPU) is left alone; with none, the CPU
# wheel torch==2.13.0 is installed first, so that the `torch>=2.3` requirement does not
# pull a multi-GB CUDA build. Override with RNNGRAD_TORCH="torch==X.Y" if you need another.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch in $VENV; installing the CPU wheel ${RNNGRAD_TORCH:-torch==2.13.0}"
  "$PY" -m pip install -q "${RNNGRAD_TORCH:-torch==2.13.0}"
else
  echo "setup: keeping $("$PY" -c 'import torch; print("torch", torch.__version__)')"
fi
"$PY" -m pip install -q -e ".[dev,ray,neuro]"
echo "setup: done ($("$PY" -c 'import rnngrad, torch; print("rnngrad", rnngrad.__version__, "torch", torch.__version__)'))"
