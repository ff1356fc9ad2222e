#!/usr/bin/env bash
# Runs the Python matchmaker example against a fresh `roomsched serve` (in-memory store,
# simulated backend) and exits with the matchmaker's status. CI calls it from the repository
# root; it works from any directory.
#
#   ROOMSCHED_BIN=path/to/roomsched   use this binary instead of `cargo build --release`
#   PYTHON=python3.11                 the interpreter for the virtualenv (default python3)
#   ROOMSCHED_PYENV=dir               the virtualenv (default <target dir>/pyenv, reused)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/examples/python"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
PYTHON="${PYTHON:-python3}"
VENV="${ROOMSCHED_PYENV:-$TARGET_DIR/pyenv}"

say() { echo "[run.sh] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

SERVER_PID=""
SERVER_LOG=""
MATCHMAKER_PID=""
stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do   # up to 5 s for a graceful shutdown, then SIGKILL
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
cleanup() {
    trap '' INT TERM   # a second Ctrl-C must not cut the cleanup short
    [[ -z "$MATCHMAKER_PID" ]] || kill -TERM "$MATCHMAKER_PID" 2>/dev/null || true
    stop_server
    [[ -z "$SERVER_LOG" ]] || rm -f "$SERVER_LOG"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. Python virtualenv with the pinned requirements (reinstalled only when they change).
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 9)' 2>/dev/null \
    || die "$PYTHON not found or older than 3.9"
if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    say "creating virtualenv $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
        # Debian/Ubuntu without python3-venv: no ensurepip. Use the system pip instead.
        rm -rf "$VENV"
        "$PYTHON" -m venv --without-pip "$VENV" || die "could not create a virtualenv"
    fi
fi
PY="$VENV/bin/python"
if "$PY" -m pip --version >/dev/null 2>&1; then
    PIP=("$PY" -m pip)
else
    PIP=("$PYTHON" -m pip --python "$PY")
fi
if ! cmp -s "$HERE/requirements.txt" "$VENV/.roomsched-requirements.txt"; then
    say "installing $HERE/requirements.txt"
    "${PIP[@]}" install --quiet --disable-pip-version-check -r "$HERE/requirements.txt"
    cp "$HERE/requirements.txt" "$VENV/.roomsched-requirements.txt"
fi

# 2. The server binary.
if [[ -n "${ROOMSCHED_BIN:-}" ]]; then
    BIN="$ROOMSCHED_BIN"
    [[ -x "$BIN" ]] || die "ROOMSCHED_BIN=$BIN is not an executable file"
else
    command -v cargo >/dev/null || die "cargo not found; install Rust or set ROOMSCHED_BIN"
    say "cargo build --release --bin roomsched"
    cargo build --release --bin roomsched
    BIN="$TARGET_DIR/release/roomsched"
fi

# 3. Start the server on a free port and wait (at most ~30 s) until its health check answers.
#    If another program grabs the port first, the server exits and we try another port.
SERVER_LOG="$(mktemp "${TMPDIR:-/tmp}/roomsched-serve.XXXXXX")"
health_check() {
    "$PY" - "$1" <<'EOF'
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
try:
    with grpc.insecure_channel(sys.argv[1]) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
    sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
except grpc.RpcError:
    sys.exit(1)
EOF
}
ADDR=""
for attempt in 1 2 3; do
    PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    say "starting $BIN serve --listen 127.0.0.1:$PORT (attempt $attempt)"
    "$BIN" serve --listen "127.0.0.1:$PORT" --store memory --backend simulated \
        --sim-start-delay 200ms >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            wait "$SERVER_PID" 2>/dev/null || true
            SERVER_PID=""
            say "server exited early:"; cat "$SERVER_LOG" >&2
            break
        fi
        if health_check "127.0.0.1:$PORT"; then ADDR="127.0.0.1:$PORT"; break 2; fi
        sleep 0.2
    done
    stop_server
done
[[ -n "$ADDR" ]] || die "roomsched serve did not become healthy"
say "server healthy at $ADDR"

# 4. The matchmaker. Its exit status is ours; the EXIT trap stops the server. It runs in the
#    background so that a signal to this script is handled at once, not after it finishes.
"$PY" "$HERE/matchmaker.py" --addr "$ADDR" &
MATCHMAKER_PID=$!
status=0
wait "$MATCHMAKER_PID" || status=$?
MATCHMAKER_PID=""
if ((status != 0)); then
    say "matchmaker failed (exit $status); server log:"
    cat "$SERVER_LOG" >&2
fi
exit "$status"
