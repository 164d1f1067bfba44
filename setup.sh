#!/usr/bin/env bash
# Set up minillama: pinned Python packages, then the assets (tokenizer, data, reference tensors,
# checkpoints), each checked against its SHA-256. Safe to run again: it skips what is in place.
#
#   TORCH_SPEC   pip requirement for torch (default: torch==2.13.0, CPU). For CUDA, e.g.
#                TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
#   MINILLAMA_ASSETS   a directory holding the assets (default: ../shared/assets if present)
#   SKIP_PIP=1         place assets only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

COURSE_URL="https://raw.githubusercontent.com/neubig/minllama-assignment/main"
STORIES42M_URL="https://www.cs.cmu.edu/~vijayv/stories42M.pt"
STORIES260K_URL="https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin"
PYTHON="${PYTHON:-python3}"

# --- packages ------------------------------------------------------------------------------
if [ "${SKIP_PIP:-0}" != 1 ]; then
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
  "$PYTHON" -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
  # requirements.txt: the course's packages (all a submission folder has). requirements-extra.txt (what
  # Hugging Face folders and exports need) and requirements-dev.txt (tests) exist only in the full project.
  extra=()
  for f in requirements-extra.txt requirements-dev.txt; do [ -f "$f" ] && extra+=(-r "$f"); done
  grep -v '^torch' requirements.txt | "$PYTHON" -m pip install -q -r /dev/stdin "${extra[@]}"
  # bubblewrap isolates generated code in codegen's sandbox; without it the sandbox falls back to rlimits.
  if [ -d codegen ] && ! command -v bwrap >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get install -y -qq bubblewrap >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; }; } ||
      echo "setup: could not install bubblewrap; the code sandbox will use its rlimits fallback"
  fi
fi

# --- assets ----------------------------------------------------------------------------------
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

# place DEST SHA256 [URL]: keep a good local file, else copy from the asset directory, else download.
place() {
  local dest=$1 sha=$2 url=${3:-} src tmp
  sha_ok "$dest" "$sha" && return 0
  mkdir -p "$(dirname "$dest")"
  for dir in ${MINILLAMA_ASSETS:-} ../shared/assets; do
    src="$dir/$dest"
    if sha_ok "$src" "$sha"; then cp "$src" "$dest" && chmod u+w "$dest" && return 0; fi
  done
  if [ -n "$url" ]; then
    tmp="$dest.part"
    if curl -fsSL --connect-timeout 10 --retry 2 -o "$tmp" "$url" 2>/dev/null && sha_ok "$tmp" "$sha"; then
      mv "$tmp" "$dest" && return 0
    fi
    rm -f "$tmp"
  fi
  echo "setup: could not place $dest (no copy in \$MINILLAMA_ASSETS or ../shared/assets${url:+, download failed})" >&2
  return 1
}

failed=0
while read -r sha dest url; do
  place "$dest" "$sha" "$url" || failed=1
done <<EOF_ASSETS
9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347 tokenizer.model $COURSE_URL/tokenizer.model
34f7c763a3bb025940029bd970594e985bf69b7ed6e693a8f5cccbef0cee55b0 sanity_check.data $COURSE_URL/sanity_check.data
57b5f9defc9489955829a935d972b85a5fa69f482c7aabdd496e24ffc1b082ee rotary_embedding_actual.data $COURSE_URL/rotary_embedding_actual.data
77b817e0dce16a9bc8d3a6bcb88035db68f7d783dc8a565737581fadd05db815 optimizer_test.npy $COURSE_URL/optimizer_test.npy
b38f0c095c4624e85927116728140e96d0221969b34146f65eae5b5bb24752b8 data/cfimdb-dev.txt $COURSE_URL/data/cfimdb-dev.txt
afeac43f5a5fe8758469078418519df4c8503c2e30e2fcf6c61464fce3d44a36 data/cfimdb-label-mapping.json $COURSE_URL/data/cfimdb-label-mapping.json
8ad2f6da7bfb0e8fc36cf89eda47c574cc9c35d6347e665f31bc904d9ecfe0a7 data/cfimdb-test.txt $COURSE_URL/data/cfimdb-test.txt
278e200499d1d68a1a9d80e3947a2203cc97130632d8a53f2b9c11de9cb6c699 data/cfimdb-train.txt $COURSE_URL/data/cfimdb-train.txt
11963c76cd073e68006da0390620aadf5a4b8f775e2f900e92a50b3002e39b9b data/sst-dev.txt $COURSE_URL/data/sst-dev.txt
831e6914e25d9b9eb56ff9095b3f035bdaf1b9568d385a70ef481c82af0382b3 data/sst-label-mapping.json $COURSE_URL/data/sst-label-mapping.json
bdcc8352d37bdc82113e4a4dd887b824144201539d5a1e49be566232d306a4ba data/sst-test.txt $COURSE_URL/data/sst-test.txt
7aeac81f2a387f2ce7fab98ed8f40ef85cc9c8ad11bcbb63b122e95665cb1f35 data/sst-train.txt $COURSE_URL/data/sst-train.txt
9414d5a285453a7eab631713d171753232c978f6f97654211469aff8be93c8d6 reference/stories260K.bin $STORIES260K_URL
14daf145194febe7203bf7c0d66a859ccb1c1e58ef069e06067b1848e2a6d783 reference/stories260K_reference.pt
EOF_ASSETS

# stories42M.pt: its hash is not published, so any complete download is kept.
if [ ! -f stories42M.pt ]; then
  if curl -fsSL --connect-timeout 10 -o stories42M.pt.part "$STORIES42M_URL" 2>/dev/null; then
    mv stories42M.pt.part stories42M.pt
  else
    rm -f stories42M.pt.part
    echo "setup: stories42M.pt not downloaded (no network?). Tests do not need it; to try every command without it," \
         "pretrain a small base model first (README, 'Quickstart without stories42M.pt')"
  fi
fi

[ "$failed" = 0 ] || { echo "setup: some assets are missing; tests needing them will skip" >&2; }
echo "setup: done"
