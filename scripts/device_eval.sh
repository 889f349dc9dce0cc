#!/bin/bash
# Device call 2 (see scripts/device_prepare.sh; call 1 stashed part 1 of the GGUF):
# assemble the model, then RULER at 32k (RULER_TASKS, RULER_S seconds). Add evals
# after it one at a time: side by side they ran out of GPU memory.
source scripts/device_setup.sh
mkdir -p /tmp/books
python3 -c "import tarfile; tarfile.open('.carry/books.tar.xz').extractall('/tmp/books')" || exit 6
cd $SRC  # python -m puts the working directory first on sys.path
python3 -c "from lmqa.model.loading import load_model; load_model('smollm2-135m-landmark', device='cpu')" > /dev/null 2>&1 || exit 7
log ready
G="--device cuda"
timeout -s INT ${RULER_S:-200} python3 -m lmqa eval $G --tasks ${RULER_TASKS:-ruler} --lengths 32000 --trials 1 --books /tmp/books/eval -o /tmp/ruler > $OUT/ruler.txt 2>&1
log done
cp /tmp/ruler/ruler.json $OUT/ 2>/dev/null
