#!/usr/bin/env bash
# README command (b): set up (with the test extra) and run the whole test suite.
# Two pytest-xdist workers (one per core of the reference 2-core machine; JAXLLM_TEST_WORKERS
# overrides), whole files per worker so that module-scoped fixtures (trained tiny runs) are built
# once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec .venv/bin/python -m pytest tests -q -n "${JAXLLM_TEST_WORKERS:-2}" --dist loadfile "$@"
