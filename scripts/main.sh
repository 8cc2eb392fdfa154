#!/usr/bin/env bash
# README command (a): set up, then train a small Llama on the embedded corpus (the CPython
# standard library's source), evaluate bits per byte against a unigram baseline, save a
# checkpoint, print a sample and write runs/main/loss.png. Extra arguments go to `jaxllm train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/jaxllm train --config experiments/configs/main.toml "$@"
