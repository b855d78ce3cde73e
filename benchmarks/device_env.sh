# Sourced by the prepared device scripts (gpu_runtime_check.sh, gpu_server_check.sh), from the repository root:
# checks $OUT, makes $WORK, installs the wheels carried in .whl/ (what a GPU machine lacks) and picks $PY.
: "${OUT:?set OUT to an output folder}"
mkdir -p "$OUT"
WORK="${WORK:-$(mktemp -d)}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# the project's venv when there is one (make install-dev), else the machine's python3 (a GPU machine)
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
