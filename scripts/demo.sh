#!/usr/bin/env bash
# Install what is needed, then run polyvisor's main job on its embedded default: the disk demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/polyvisor demo "$@"
