#!/bin/bash
# One part of a training run on a lent GPU, after scripts/device_prepare.sh here and a first
# call that stashed part 1 of the GGUF and the QA data:
#   run(command="mkdir -p /root/stash && cp .carry/p1 .carry/qa.tar.xz /root/stash/", carry=[".carry/p1", ".carry/qa.tar.xz"])
#   run(command="BENCH=1 STEPS=800 MINUTES=6.5 bash scripts/device_train.sh", carry=[".carry/p2", ".carry/wheels", ".carry/train-books.tar.xz", "runs/src", "runs/init"])
# INIT: the adapter directory to start from (default: the shipped one; a previous part's
# adapter travels in runs/init). Writes $OUT/adapter.tar (adapter, runs.jsonl, losses, plot)
# and $OUT/train.log. Set TRAIN_ARGS to change the mix.
source scripts/device_setup.sh
mkdir -p /tmp/books /tmp/qa
python3 -c "import tarfile; tarfile.open('/root/stash/qa.tar.xz').extractall('/tmp/qa'); tarfile.open('.carry/train-books.tar.xz').extractall('/tmp/books')" || exit 5
log unpacked
cd $SRC  # python -m puts the working directory first on sys.path
[ -z "$SKIP_TESTS" ] && python3 -m pytest -q -p no:cacheprovider tests/test_fused_attention.py 2>&1 | tail -3
log tested
if [ -n "$BENCH" ]; then  # the training step per attention form, real model, this card
  python3 -m lmqa bench --train --device cuda --steps 3 > $OUT/bench_train.txt 2>&1; tail -8 $OUT/bench_train.txt
  log benched
fi
STDLIB=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
INIT=${INIT:-$ROOT/models/smollm2-135m-landmark}
[ -f $ROOT/runs/init/adapter_model.safetensors ] && INIT=$ROOT/runs/init
log "training from $INIT"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
FREE=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1)
if [ "${FREE:-0}" -lt 50000 ]; then BATCH=4; ACCUM=4; log "only $FREE MiB free: batch 4 x 4 accumulated"; fi
python3 -m lmqa train /tmp/books/train --code "$STDLIB" --qa-data /tmp/qa -o /tmp/run \
  --init-adapter "$INIT" --context 2048 --batch-size ${BATCH:-16} --grad-accum ${ACCUM:-1} --lr ${LR:-3e-4} --steps ${STEPS:-800} \
  --max-minutes ${MINUTES:-6.5} --save-every 100 --seed ${SEED:-3} \
  ${TRAIN_ARGS:---real-qa-rate 0.5 --qa-rate 0.5 --synthetic-rate 0.5} > $OUT/train.log 2>&1
log "trained (rc $?)"
tail -5 $OUT/train.log
mkdir -p /tmp/run/adapter; cp /tmp/run/runs.jsonl /tmp/run/losses.json /tmp/run/loss.png /tmp/run/adapter/ 2>/dev/null
tar -C /tmp/run -cf $OUT/adapter.tar adapter
ls -la $OUT
