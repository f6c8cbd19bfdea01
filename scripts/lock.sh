#!/usr/bin/env bash
# Resolve pyproject.toml into the three hashed locks at the repository root, or check that the
# committed locks still match pyproject.toml.
#
#   scripts/lock.sh           rewrite the locks (`make lock`); pins already there are kept
#                             unless pyproject.toml no longer allows them
#   scripts/lock.sh --upgrade move every pin to the newest release pyproject.toml allows
#   scripts/lock.sh --check   resolve into a scratch copy and fail if it differs (`make lock-check`)
#
#   requirements-dev.lock      tests and tools (`make venv`)
#   requirements.lock          the runtime set (the image)
#   requirements-codegen.lock  the image's codegen stage
#
# The dev lock is resolved first; the other two are constrained by the committed dev lock (in
# --check mode too: a stale dev lock fails on its own diff), so the image and the test
# environment run the same versions of every package they share.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

UV=${UV:-.venv/bin/uv}
mode=${1:-write}
locks=(requirements-dev.lock requirements.lock requirements-codegen.lock)
out=.
if [[ $mode == --check ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  cp "${locks[@]}" "$out"/
fi
upgrade=()
[[ $mode == --upgrade ]] && upgrade=(--upgrade)

compile() {
  local target=$1; shift
  "$UV" pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes --quiet \
    --custom-compile-command "make lock" "${upgrade[@]}" "$@" -o "$out/$target"
}
compile requirements-dev.lock --extra dev
compile requirements.lock -c requirements-dev.lock
compile requirements-codegen.lock --extra codegen -c requirements-dev.lock

if [[ $mode == --check ]]; then
  for lock in "${locks[@]}"; do
    if ! diff -u "$lock" "$out/$lock"; then
      echo "$lock does not match pyproject.toml: run 'make lock' and commit the result" >&2
      exit 1
    fi
  done
  echo "locks match pyproject.toml"
fi
