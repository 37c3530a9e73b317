#!/usr/bin/env bash
# Install everything the tests need (Python packages, Debian chromium and tmux) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu,test
if ! command -v chromium >/dev/null || ! command -v tmux >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium tmux >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium tmux >/dev/null
  fi
fi
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
exec .venv/bin/python -m pytest -q -ra "$@"
