#!/usr/bin/env bash
# One-shot GPU check (issue 15): see benchmarks/gpu_check.py. Usage: bash benchmarks/gpu_check.sh [--out FILE] ...
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
