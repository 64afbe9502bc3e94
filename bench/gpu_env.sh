# Sourced by bench/gpu_*.sh on a GPU machine that has torch and transformers but not this
# project's other needs: installs the carried wheels (.whl: pydantic's, for its Python)
# and puts the package (service/) and the data stand-in (.gpu/site, bench/device_bundle.py)
# on the path. Results go to $OUT (default bench/results).
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=service:.gpu/site${PYTHONPATH:+:$PYTHONPATH}
