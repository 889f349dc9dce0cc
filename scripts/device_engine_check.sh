#!/usr/bin/env bash
# The engine on a lent GPU (issue 32): the engine's CUDA tests, its golden outputs old vs new,
# and lmqa bench old vs new, all on one card in one call. runs/old and runs/new
# are `git archive` trees of 6fc1250 (before) and the commit under test (after):
#   rm -rf runs/old runs/new; mkdir -p runs/old runs/new
#   git archive 6fc1250 lmqa prompts pyproject.toml tests | tar -x -C runs/old
#   git archive HEAD lmqa prompts pyproject.toml tests | tar -x -C runs/new
# Call 1: run(command="mkdir -p /root/stash && cp .carry/p1 /root/stash/p1", carry=[".carry/p1"])
# Call 2 (within 30 s): run(command="bash scripts/device_engine_check.sh",
#                           carry=[".carry/p2", ".carry/wheels", "runs/old", "runs/new"])
set -uo pipefail
source scripts/device_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/card.txt
# 1. the engine's CUDA-marked tests, new tree
(cd runs/new && PYTHONPATH=$PWD:/tmp/site python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_engine.py \
  tests/test_layer_prefill.py tests/test_graph_decode.py tests/test_block_store.py tests/test_landmark_scoring.py \
  tests/test_cache.py tests/test_retrieval.py 2>&1 | tee $OUT/cuda_tests.log | tail -15)
# 2. golden outputs on this card: old tree, new tree, compared (CHANGED names what may differ)
for t in old new; do
  (cd runs/new && PYTHONPATH=$ROOT/runs/$t:/tmp/site python3 tests/test_engine_golden.py cuda $OUT/golden_$t.safetensors)
done
(cd runs/new && PYTHONPATH=$PWD:/tmp/site python3 tests/test_engine_golden.py --compare $OUT/golden_old.safetensors \
  $OUT/golden_new.safetensors 2>&1 | tee $OUT/golden_compare.txt | head -40)
# 3. lmqa bench, old then new, twice (the card named in card.txt)
i=0
for t in old new old new; do
  i=$((i + 1))
  (cd runs/$t && PYTHONPATH=$PWD:/tmp/site python3 -m lmqa bench --device cuda --lengths 2000,8000 \
    --prefill layer,serial --json) > $OUT/bench_$i.$t.json 2> $OUT/bench_$t.err
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].rsplit('/')[-1], d['gpu'], [(r['method'], r['tokens'], round(r['prefill_tok_s']), round(r['decode_ms'], 2)) for r in d['rows']])" $OUT/bench_$i.$t.json
done
