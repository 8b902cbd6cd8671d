#!/usr/bin/env bash
# Fills .cache/gpu_site (git-ignored) with what the GPU machine lacks to import Detectron2 and sparse_detr
# (it has torch, torchvision, numpy, scipy, opencv, yaml, tabulate, tqdm, portalocker but no network):
# Detectron2's Python code and its pure-Python needs copied from this checkout's .venv, and pycocotools as
# the wheel for that machine's CPython 3.12. run_gpu_checks.sh puts the folder on PYTHONPATH. About 6 MB.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="$ROOT/.venv/bin/python"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
DEST="$ROOT/.cache/gpu_site"
rm -rf "$DEST"
mkdir -p "$DEST"
for package in detectron2 fvcore iopath yacs omegaconf antlr4 termcolor; do
  cp -r "$SITE/$package" "$DEST/"
done
find "$DEST" -name __pycache__ -prune -exec rm -rf {} +
rm -f "$DEST"/detectron2/_C*.so  # built for CPython 3.10; this project does not use Detectron2's own ops
WHEELS="$(mktemp -d)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d "$WHEELS" "pycocotools==$("$PY" -c 'import importlib.metadata as m; print(m.version("pycocotools"))')"
(cd "$DEST" && "$PY" -m zipfile -e "$WHEELS"/pycocotools-*.whl .)
rm -rf "$WHEELS"
echo "$DEST: $(du -sh "$DEST" | cut -f1)"
