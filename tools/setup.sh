#!/usr/bin/env bash
# One-command, idempotent setup: a .venv with CPython 3.11, the pinned dependencies of
# tools/requirements.txt, Detectron2 (sal-detectron2 wheel), and this package in editable mode
# with its C++ extension compiled. A second run checks stamps and takes seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
REQ="$ROOT/tools/requirements.txt"
PY="$VENV/bin/python"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

log() { echo "[setup] $*"; }

if [ ! -x "$PY" ]; then
  log "creating $VENV"
  python3.11 -m venv "$VENV"
fi

deps_hash=$(sha256sum "$REQ" | cut -c1-16)
if [ "$(cat "$VENV/.deps-stamp" 2>/dev/null)" != "$deps_hash" ]; then
  log "installing pinned dependencies (torch takes about a minute)"
  "$PY" -m pip install -q --upgrade "pip<26" setuptools wheel
  grep -vE '^\s*(#|$)|^(sal-detectron2|deepforest|imgsim)==' "$REQ" > "$VENV/.requirements-pip.txt"
  "$PY" -m pip install -q -r "$VENV/.requirements-pip.txt"
  # Data-only packages: their files are read, their code is never imported.
  "$PY" -m pip install -q --no-deps $(grep -E '^(deepforest|imgsim)==' "$REQ")
  d2_pin=$(grep -E '^sal-detectron2==' "$REQ")
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # The wheel is tagged for CPython 3.10 only; its Python code runs unchanged on 3.11.
  "$PY" -m pip install -q --no-deps --python-version 3.10 --only-binary=:all: \
      --target "$site" --upgrade "$d2_pin"
  echo "$deps_hash" > "$VENV/.deps-stamp"
fi

# Rebuild the extension only when its sources or the build script changed.
src_hash=$(cat "$ROOT/setup.py" $(find "$ROOT/csrc" -type f | sort) | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.ext-stamp" 2>/dev/null)" != "$src_hash" ] || \
   ! ls "$ROOT"/sparse_detr/_C*.so >/dev/null 2>&1 || \
   ! "$PY" -c 'import sparse_detr' >/dev/null 2>&1; then
  if [ ! -d "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/sparse_detr-0.1.0.dist-info" ]; then
    log "installing the package in editable mode (compiles sparse_detr._C)"
    (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -q --no-deps --no-build-isolation -e .)
  fi
  log "compiling sparse_detr._C (incremental)"
  (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext --inplace >"$VENV/.ext-build.log" 2>&1) \
    || { tail -40 "$VENV/.ext-build.log"; log "extension build FAILED (full log: $VENV/.ext-build.log)"; exit 1; }
  echo "$src_hash" > "$VENV/.ext-stamp"
fi
log "ready: $("$PY" -c 'import torch, detectron2, sparse_detr; print("torch", torch.__version__, "| detectron2", detectron2.__version__, "| sparse_detr", sparse_detr.__version__)')"
