#!/usr/bin/env bash
# `make serve`: TorchServe in the foreground with serve/config.properties and
# model-store/imgtocap.mar. Ctrl-C runs `torchserve --stop`, which waits until the frontend and
# its workers have exited.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
CONFIG=${TS_CONFIG_FILE:-serve/config.properties} # TorchServe itself prefers TS_CONFIG_FILE too
export LOG_LOCATION=${LOG_LOCATION:-logs/torchserve} METRICS_LOCATION=${METRICS_LOCATION:-logs/torchserve}
# TorchServe finds its server by $TMPDIR/.model_server.pid: this checkout's own (serve/serve.mk's
# RUN), so that `make stop` here stops this server and never another checkout's.
export TMPDIR="$PWD/logs/torchserve/run"
mkdir -p "$TMPDIR"
# Workers inherit this. OpenMP threads that spin while idle stall (10x and worse) as soon as
# another process holds a core; sleeping ones cost nothing measurable.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

address() { sed -n "s|^$1=||p" "$CONFIG" | sed 's|//0\.0\.0\.0:|//127.0.0.1:|'; }
cat <<EOF
Starting TorchServe ($CONFIG): token auth is on; logs in $LOG_LOCATION/. Once the model is
READY (log line "imgtocap ready"), from this directory in another terminal:

  KEY=\$(python3 -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
  curl -H "Authorization: Bearer \$KEY" -T image.jpg $(address inference_address)/predictions/imgtocap

  MKEY=\$(python3 -c 'import json; print(json.load(open("key_file.json"))["management"]["key"])')
  curl -H "Authorization: Bearer \$MKEY" $(address management_address)/models/imgtocap

Keys last until TorchServe stops (docs/serving.md, tokens). A TorchServe that dies is
started again, with new keys in key_file.json. Ctrl-C (or `make stop`) stops it.

EOF

# `make stop` (serve/serve.mk) leaves this file before it stops the server: an exit with it is
# asked for, one without it a crash (a killed JVM takes the launcher and the worker with it).
STOP_REQUEST="$TMPDIR/stop-requested"
rm -f "$STOP_REQUEST"
stopping=false
stop() {
  stopping=true
  echo "Stopping TorchServe..."
  "$BIN/torchserve" --stop --foreground
}
trap stop INT TERM
while true; do
  # In the background, so that Ctrl-C reaches only this script (a non-interactive shell starts
  # background jobs with SIGINT ignored) and the trap stops TorchServe in order: the frontend
  # first asks its workers to exit, instead of every process dying at once.
  started=$SECONDS
  "$BIN/torchserve" --start --foreground --ncs --ts-config "$CONFIG" &
  server=$!
  wait "$server" # returns early when the trap runs ...
  status=$?
  if kill -0 "$server" 2>/dev/null; then # ... then wait for the launcher to exit too
    wait "$server"
    status=$?
  fi
  if $stopping || [ -e "$STOP_REQUEST" ]; then
    rm -f "$STOP_REQUEST"
    exit "$status"
  fi
  # A server that dies young (a port taken, a broken archive) would die again at once: wait
  # longer before the next try, and say where to look.
  pause=$((SECONDS - started < 60 ? 10 : 1))
  echo "TorchServe exited unasked (status $status; logs in $LOG_LOCATION/): starting it again" \
    "in $pause s. Its keys change: clients need the new ones from key_file.json" >&2
  sleep "$pause" &
  wait $! # a Ctrl-C meanwhile runs the trap, and the loop ends below
  if $stopping; then exit 1; fi
done
