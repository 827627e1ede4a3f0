#!/usr/bin/env bash
# The LMCache serde plugin against the real lmcache package, in its own venv (lmcache pins
# numpy <= 2.2.6, which the main environment does not). Usage: bash tests/lmcache_venv/run.sh [VENV]
# The run recorded in tests/lmcache_venv/RECORDED_RUN.txt was made with this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${1:-${TMPDIR:-/tmp}/cachegen-lmcache-venv}"
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torch first, pinned like .ci/install, so lmcache's unpinned torch does not pull a CUDA build
$VENV/bin/python -c "import torch" 2>/dev/null || $PIP "torch==2.13.*"
$PIP "torch==2.13.*" "lmcache==0.5.6" "constriction>=0.4,<0.6" "zstandard>=0.22" pytest
$PIP --no-deps -e .
$VENV/bin/python -c "import lmcache, numpy, torch; from importlib.metadata import version; print('lmcache', version('lmcache'), 'numpy', numpy.__version__, 'torch', torch.__version__)"
$VENV/bin/python -m pytest -v -p no:cacheprovider -o addopts="" -W ignore::DeprecationWarning tests/test_lmcache.py
