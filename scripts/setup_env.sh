#!/usr/bin/env bash
# Creates .venv (if missing) and installs jaxllm with the given extras. Idempotent.
#   bash scripts/setup_env.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.jaxllm-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch==2.13.0 is pinned in the test extra: that CPU build is what pip finds locally.
  .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
