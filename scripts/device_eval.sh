#!/bin/bash
# Device call 2 (see scripts/device_prepare.sh; call 1 stashed part 1 of the GGUF):
# assemble the model, then RULER at 32k (RULER_TASKS, RULER_S seconds). Add evals
# after it one at a time: side by side they ran out of GPU memory.
export PYTHONUNBUFFERED=1 LMQA_CACHE=/root/lmqa-cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$SECONDS
log() { echo "[$((SECONDS - T0)) s] $*"; }
unxz() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/wheels/*.whl || exit 3
export PYTHONPATH=$PWD:/tmp/site
[ -f /root/stash/p1 ] || { echo "no stash"; exit 2; }
mkdir -p $LMQA_CACHE/gguf /tmp/books
cat /root/stash/p1 .carry/p2 | unxz > $LMQA_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf || exit 4
python3 -c "import tarfile; tarfile.open('.carry/books.tar.xz').extractall('/tmp/books')" || exit 6
python3 -c "from lmqa.model.loading import load_model; load_model('smollm2-135m-landmark', device='cpu')" > /dev/null 2>&1 || exit 7
log ready
G="--device cuda"
timeout -s INT ${RULER_S:-200} python3 -m lmqa eval $G --tasks ${RULER_TASKS:-ruler} --lengths 32000 --trials 1 --books /tmp/books/eval -o /tmp/ruler > $OUT/ruler.txt 2>&1
log done
cp /tmp/ruler/ruler.json $OUT/ 2>/dev/null
