#!/usr/bin/env bash
# Run the benchmark from the repository root: `bash bench/run.sh [--quick] [--only SCENARIO ...]`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" -m bench "$@"
