# Sourced by the device_*.sh scripts on a lent GPU: environment, the wheels the
# image lacks, and the default model's GGUF from its two parts (call 1 stashed
# part 1 in /root/stash, this call carries .carry/p2; see device_prepare.sh).
# runs/src (git-ignored), if present, is a clean `git archive` of the commit to
# run, so edits in progress in the working tree cannot break a call:
#   git archive HEAD lmqa prompts pyproject.toml tests/conftest.py tests/test_fused_attention.py | tar -x -C runs/src
export PYTHONUNBUFFERED=1 LMQA_CACHE=/root/lmqa-cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$SECONDS
log() { echo "[$((SECONDS - T0)) s] $*"; }
unxz() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/wheels/*.whl || exit 3
ROOT=$PWD
SRC=$ROOT; [ -d runs/src/lmqa ] && SRC=$ROOT/runs/src
export PYTHONPATH=$SRC:/tmp/site LMQA_MODELS=$ROOT/models
[ -f /root/stash/p1 ] || { echo "no stash"; exit 2; }
mkdir -p $LMQA_CACHE/gguf
cat /root/stash/p1 .carry/p2 | unxz > $LMQA_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf || exit 4
