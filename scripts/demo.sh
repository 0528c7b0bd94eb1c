#!/usr/bin/env bash
# The seed's walkthrough, end to end, on the embedded services (tdapp up):
# build the copy DApp, encrypt and push the inputs, run it attested and
# sandboxed, fetch and decrypt the outputs. Run by `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
WORK="$PWD/demo-work"
rm -rf "$WORK" && mkdir -p "$WORK"
export TDAPP_HOME="$WORK/home"
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

step "tdapp up &   (CAS in debug mode, LAS, transfer service)"
tdapp up >"$WORK/up.log" 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do [ -f "$TDAPP_HOME/up.json" ] && break; sleep 0.2; done
[ -f "$TDAPP_HOME/up.json" ] || { cat "$WORK/up.log"; echo "tdapp up did not start"; exit 1; }
cat "$WORK/up.log"

step "tdapp build examples/copy_dapp --name copy_demo -o copy_dapp.yml"
tdapp build examples/copy_dapp --name copy_demo -o "$WORK/copy_dapp.yml" 2>/dev/null

cd "$WORK"
step "inputs"
mkdir -p EXAMPLE && cd EXAMPLE && mkdir -p KEYS INPUTS OUTPUTS ZIP
echo "Hello world" > INPUTS/f1.txt
echo "Hello together" > INPUTS/f2.txt
cp ../copy_dapp.yml KEYS/

step "CMD=\$(tdapp encryptedpush --application copy_demo -t KEYS/copy_dapp.yml)"
CMD=$(tdapp encryptedpush --application copy_demo -t KEYS/copy_dapp.yml)
echo "$CMD"

step "URL=\$(tdapp run copy_demo \$CMD --push http://127.0.0.1:8090/upload)"
# shellcheck disable=SC2086
URL=$(tdapp run copy_demo $CMD --push http://127.0.0.1:8090/upload)
echo "$URL"

step "curl --output ZIP/encryptedOutputFiles.zip \$URL"
curl --silent --show-error --fail --output ZIP/encryptedOutputFiles.zip "$URL"

step "tdapp decrypt"
tdapp decrypt

step "cat OUTPUTS/f1.txt OUTPUTS/f2.txt"
cat OUTPUTS/f1.txt OUTPUTS/f2.txt
