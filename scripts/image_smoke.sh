#!/usr/bin/env bash
# Smoke test of the container image with podman (or docker): registry, engine-sim, agent and a
# router with `--tokenizer hf` as containers on the host network, then the operator CLI through
# the image: health, nodes, route --prompt (released), a completion on the engine with the same
# token ids, route again (now 1 cached block), stats. Prints the image size first.
#   scripts/image_smoke.sh IMAGE
#   ENGINE=docker scripts/image_smoke.sh kvroute:0.1.0
#   RUN_ARGS="--runtime runc --ulimit nofile=1024:1024" scripts/image_smoke.sh IMAGE  (nested)
# Removes exactly the containers it started (names kvroute-smoke-*).
set -euo pipefail
img=${1:?usage: scripts/image_smoke.sh IMAGE}
engine=${ENGINE:-podman}
read -r -a extra <<<"${RUN_ARGS:-}"
run=("$engine" run "${extra[@]}" --network host)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
reg=$(port) rt=$(port) http=$(port) ev=$(port) rp=$(port) ag=$(port)
names=(kvroute-smoke-registry kvroute-smoke-engine kvroute-smoke-agent kvroute-smoke-router)
tok=$(mktemp -d)
cleanup() { for n in "${names[@]}"; do "$engine" rm -f "$n" >/dev/null 2>&1 || true; done; rm -rf "$tok"; }
trap cleanup EXIT
chmod 755 "$tok"
kv() { "${run[@]}" --rm "$img" "$@"; }
py() { "${run[@]}" --rm -v "$tok:/tok" --user 0 --entrypoint /opt/kvroute/bin/python "$img" -c "$1"; }
prompt="the quick brown fox jumps over the lazy dog while a router sends each request to the node that holds its prefix"

echo "image: $img, $("$engine" image inspect "$img" --format '{{.Size}}') bytes"
# A small word-level tokenizer.json, made by the image's own tokenizers package.
py "from tokenizers import Tokenizer, models, pre_tokenizers, trainers
t = Tokenizer(models.WordLevel(unk_token='[UNK]')); t.pre_tokenizer = pre_tokenizers.Whitespace()
t.train_from_iterator(['$prompt'] * 10, trainers.WordLevelTrainer(special_tokens=['[UNK]']))
t.save('/tok/tokenizer.json')"
chmod 644 "$tok/tokenizer.json"
"${run[@]}" -d --name kvroute-smoke-registry "$img" serve registry --store memory \
  --listen "127.0.0.1:$reg" --metrics-listen 127.0.0.1:0 >/dev/null
"${run[@]}" -d --name kvroute-smoke-engine "$img" serve engine-sim --listen "127.0.0.1:$http" \
  --metrics-listen 127.0.0.1:0 --events-endpoint "tcp://127.0.0.1:$ev" \
  --replay-endpoint "tcp://127.0.0.1:$rp" --model sim >/dev/null
"${run[@]}" -d --name kvroute-smoke-agent "$img" serve agent --registry "127.0.0.1:$reg" \
  --listen "127.0.0.1:$ag" --metrics-listen 127.0.0.1:0 --node-id engine-0 \
  --engine-url "http://127.0.0.1:$http" --model sim --capacity-blocks 4096 \
  --engine-events "tcp://127.0.0.1:$ev" --engine-replay "tcp://127.0.0.1:$rp" >/dev/null
"${run[@]}" -d --name kvroute-smoke-router -v "$tok:/tok:ro" "$img" serve router \
  --registry "127.0.0.1:$reg" --listen "127.0.0.1:$rt" --metrics-listen 127.0.0.1:0 \
  --tokenizer hf --tokenizer-file /tok/tokenizer.json >/dev/null
for _ in $(seq 1 60); do kv health --server "127.0.0.1:$rt" --quiet 2>/dev/null && break; sleep 1; done
echo "--- user:"; "${run[@]}" --rm --entrypoint id "$img"
echo "--- health:"; kv health --server "127.0.0.1:$rt"; kv health --server "127.0.0.1:$reg"
echo "--- nodes:"; kv nodes --registry "127.0.0.1:$reg"
echo "--- route --prompt (router --tokenizer hf):"; kv route --router "127.0.0.1:$rt" --prompt "$prompt"
ids=$(py "from tokenizers import Tokenizer
print(Tokenizer.from_file('/tok/tokenizer.json').encode('$prompt', add_special_tokens=False).ids)")
echo "--- the same token ids as a completion on the engine: $ids"
py "import json, urllib.request
req = urllib.request.Request('http://127.0.0.1:$http/v1/completions', headers={'content-type': 'application/json'},
      data=json.dumps({'model': 'sim', 'prompt': $ids, 'max_tokens': 2}).encode())
print(urllib.request.urlopen(req, timeout=30).status)"
sleep 2
echo "--- route --prompt again (the engine now caches the first block):"
kv route --router "127.0.0.1:$rt" --prompt "$prompt"
echo "--- stats:"; kv stats --router "127.0.0.1:$rt"
