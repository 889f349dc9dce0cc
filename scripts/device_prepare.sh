#!/usr/bin/env bash
# Prepare .carry/ (git-ignored) for a lent GPU, which reaches no network and takes
# 64 MiB a call: the default model's GGUF (98 MB) goes in two xz parts over two
# calls made within 30 s of each other (the machine's /tmp and /root survive that
# long), the wheels its image lacks, the books the evals read, and the QA data
# `lmqa train --qa-data` reads (there: mkdir -p qa && tar -C qa -xJf .carry/qa.tar.xz;
# then --qa-data qa).
#
#   bash scripts/device_prepare.sh
#   run(command="mkdir -p /root/stash && cp .carry/p1 /root/stash/p1", carry=[".carry/p1"])
#   run(command="bash scripts/device_eval.sh", carry=[".carry/p2", ".carry/wheels", ".carry/books.tar.xz"])
#
# Run lmqa processes there one after another: side by side they ran out of GPU memory.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .carry/wheels
gguf=$(ls "${LMQA_CACHE:-$HOME/.cache/lmqa}"/gguf/*.gguf)  # `lmqa models pull` puts it there
xz -T2 -c "$gguf" > .carry/model.xz
split -b 48M -a 1 --numeric-suffixes=1 .carry/model.xz .carry/p  # .carry/p1, .carry/p2
rm .carry/model.xz
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .carry/wheels gguf platformdirs pypdf ebooklib prompt_toolkit wcwidth bm25s PyStemmer
tar -C ../shared/books -cJf .carry/books.tar.xz eval train/alice-s-adventures-in-wonderland.txt \
  train/treasure-island.txt train/the-war-of-the-worlds.txt
# human-written QA for `lmqa train --qa-data` (FairytaleQA's train split only: val/test judge the reader)
tar -C ../shared/data/qa -cJf .carry/qa.tar.xz fairytaleqa/LICENSE fairytaleqa/qa_train.jsonl \
  fairytaleqa/stories_train.jsonl squad-dev/LICENSE-CC-BY-SA-4.0.txt squad-dev/dev-v1.1.json squad-dev/dev-v2.0.json
ls -la .carry
