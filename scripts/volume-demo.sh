#!/usr/bin/env bash
# The tdapp demo: an encrypted volume made, read back, tampered with, rolled back,
# and refused each time with its reason. Run by `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
TDAPP="$PWD/.venv/bin/tdapp"
WORK="$PWD/demo-work"
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"
export TDAPP_HOME="$WORK/home"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
expect_refusal() {   # run a command that must fail; show its one-line reason
  local rc=0
  "$@" 2>refusal.txt || rc=$?
  if [ "$rc" -eq 0 ]; then echo "UNEXPECTED: the command succeeded"; exit 1; fi
  printf 'refused (exit %s): %s\n' "$rc" "$(cat refusal.txt)"
}
flip_byte() {        # flip one bit of FILE at OFFSET
  python3 - "$1" "$2" <<'PY'
import sys
path, offset = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(offset); b = f.read(1); f.seek(offset); f.write(bytes([b[0] ^ 1]))
PY
}

step "inputs"
mkdir -p INPUTS OUTPUTS
echo "Hello world" > INPUTS/f1.txt
echo "Hello together" > INPUTS/f2.txt
ls -l INPUTS

step "tdapp volume create VOLUME --from INPUTS --envar-output"
"$TDAPP" volume create VOLUME --from INPUTS --envar-output | tee keys.env
source keys.env
echo "stored folder (names hidden, contents sealed):"; find VOLUME -type f | sort

step "tdapp volume show / verify"
"$TDAPP" volume show VOLUME
"$TDAPP" volume verify VOLUME

step "tdapp volume extract VOLUME OUTPUTS"
"$TDAPP" volume extract VOLUME OUTPUTS
cat OUTPUTS/f1.txt OUTPUTS/f2.txt

step "attack 1: flip one bit of a stored file"
cp -a VOLUME VOLUME.good
victim=$(find VOLUME/objects -type f | sort | head -n1)
flip_byte "$victim" 3
expect_refusal "$TDAPP" volume verify VOLUME
rm -rf VOLUME && mv VOLUME.good VOLUME

step "attack 2: roll the volume back to an older, validly encrypted copy"
cp -a VOLUME VOLUME.old
mkdir -p MORE && echo "Hello again" > MORE/f3.txt
"$TDAPP" volume add VOLUME MORE --envar-output | tee keys.env
source keys.env
rm -rf VOLUME && mv VOLUME.old VOLUME
expect_refusal "$TDAPP" volume verify VOLUME

step "attack 3: the wrong key"
expect_refusal "$TDAPP" volume verify VOLUME \
  --key 0000000000000000000000000000000000000000000000000000000000000000

step "decrypted outputs"
for f in OUTPUTS/f1.txt OUTPUTS/f2.txt; do printf '%s: %s\n' "$f" "$(cat "$f")"; done
