#!/usr/bin/env bash
# Install everything the tests need (Python packages; Debian chromium, tmux and the PostgreSQL
# server) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu,test
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v tmux >/dev/null || missing+=(tmux)
# Debian keeps the server binaries off PATH, in /usr/lib/postgresql/<version>/bin.
command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
exec .venv/bin/python -m pytest -q -ra "$@"
