#!/usr/bin/env bash
# Resolve pyproject.toml into the three hashed locks under requirements/, or check that the
# committed locks still match pyproject.toml.
#
#   scripts/lock.sh           rewrite the locks (`make lock`); pins already there are kept
#                             unless pyproject.toml no longer allows them
#   scripts/lock.sh --upgrade move every pin to the newest release pyproject.toml allows
#   scripts/lock.sh --check   resolve into a scratch copy and fail if it differs (`make lock-check`)
#
# dev.txt is resolved first; runtime.txt and codegen.txt are constrained by the committed dev.txt
# (in --check mode too: a stale dev.txt fails on its own diff), so the image and
# the test environment run the same versions of every package they share.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

UV=${UV:-.venv/bin/uv}
mode=${1:-write}
out=requirements
if [[ $mode == --check ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  cp requirements/*.txt "$out"/
fi
upgrade=()
[[ $mode == --upgrade ]] && upgrade=(--upgrade)

compile() {
  local target=$1; shift
  "$UV" pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes --quiet \
    --custom-compile-command "make lock" "${upgrade[@]}" "$@" -o "$out/$target"
}
compile dev.txt --extra dev
compile runtime.txt -c requirements/dev.txt
compile codegen.txt --extra codegen -c requirements/dev.txt

if [[ $mode == --check ]]; then
  for lock in dev.txt runtime.txt codegen.txt; do
    if ! diff -u "requirements/$lock" "$out/$lock"; then
      echo "requirements/$lock does not match pyproject.toml: run 'make lock' and commit the result" >&2
      exit 1
    fi
  done
  echo "locks match pyproject.toml"
fi
