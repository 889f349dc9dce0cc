#!/usr/bin/env bash
# Issue 11 on one GPU: layer-major vs chunk-serial prefill, 32k to 1M tokens.
#
# Run from the repository root with the venv (CUDA torch) active and the
# default model cached (LMQA_CACHE or ~/.cache/lmqa). Every line prints its
# own table; the card's name is printed first. Expected wall time on an H100:
# well under 10 minutes if the 1M targets are met (the serial rows at 32k
# take about 45 s).
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1. correctness on the GPU (tiny float32 models: device, pinned-host and auto block stores)
python -m pytest -q tests/test_layer_prefill.py

# 2. both prefill paths in one run (the baseline for the ratio), full attention up to 32k
lmqa bench --device cuda --lengths 2000,32000 --prefill layer,serial --max-full 32000 --new-tokens 16

# 3. the targets: >= 100k tok/s at 128k, >= 50k tok/s at 1M (layer-major, --kv-offload auto)
lmqa -v bench --device cuda --lengths 32000,131072,524288,1000000 --prefill layer --max-full 0 --new-tokens 16

# 4. host-resident blocks at 1M: GPU peak and host memory
lmqa bench --device cuda --lengths 1000000 --kv-offload cpu --prefill layer --max-full 0 --new-tokens 16

# 5. passkey at 1M from the CLI (prompt building + tokenizing once, prefill, 8 tokens)
lmqa -v passkey --device cuda --length 1000000 --trials 5
