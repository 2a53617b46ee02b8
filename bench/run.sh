#!/usr/bin/env bash
# One command: set up, then benchmark polyvisor against qemu-img (arguments go to bench/convert_bench.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m bench.convert_bench "$@"
