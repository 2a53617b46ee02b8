#!/usr/bin/env bash
# Install what is needed, then run everything CI runs: lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff" && .venv/bin/ruff check src tests bench fuzz
echo "== mypy" && .venv/bin/mypy
echo "== pytest" && .venv/bin/python -m pytest -p no:cacheprovider "$@"
