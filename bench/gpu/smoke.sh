#!/usr/bin/env bash
# The one-GPU smoke check, one command, no network: bench/gpu/smoke.sh [smoke.py options, e.g. --cpu]
#
# Installs the wheels `make gpu-wheels` packed into .gpu/carry (carry that folder with the source
# tree) into .gpu/site with pip, offline and without dependencies, so the machine's own torch,
# transformers and tensorboard are used as they are; an install from the same wheel list is reused.
# Parallax itself runs from this checkout (PYTHONPATH), so its torch pin is never consulted.
# Then runs bench/gpu/smoke.py, which prints one table and exits non-zero if a check fails.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
kit=${PARALLAX_GPU_KIT:-$repo/.gpu/carry}
site=$repo/.gpu/site
python=${PYTHON:-python3}

if [[ ! -f $kit/wheels.tar.xz ]]; then
    echo "smoke.sh: $kit/wheels.tar.xz not found; run 'make gpu-wheels' on a machine with network and carry .gpu/carry" >&2
    exit 2
fi
if ! cmp -s "$kit/wheels.txt" "$site/wheels.txt"; then
    rm -rf "$site"
    unpacked=$(mktemp -d)
    trap 'rm -rf "$unpacked"' EXIT
    "$python" -m tarfile --filter data -e "$kit/wheels.tar.xz" "$unpacked"
    "$python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$site" "$unpacked"/*.whl
    cp "$kit/wheels.txt" "$site/wheels.txt"
fi

export PYTHONPATH=$repo:$site${PYTHONPATH:+:$PYTHONPATH}
export PATH=$site/bin:$PATH  # ninja, for the op DeepSpeed's CPU accelerator builds
export PARALLAX_CACHE=$kit/cache
exec "$python" "$repo/bench/gpu/smoke.py" --kit "$kit" "$@"
