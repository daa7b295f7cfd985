#!/usr/bin/env bash
# Set everything up on a fresh machine and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The local-cluster end-to-end test brings Ray's local provider up over ssh to 127.0.0.1:
# it needs Debian's openssh-server and rsync.
if ! command -v /usr/sbin/sshd >/dev/null || ! command -v rsync >/dev/null || ! command -v ssh >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing openssh-server, openssh-client and rsync for the local-cluster test"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client rsync >/dev/null
  else
    echo "[test] warning: sshd/rsync missing and cannot apt-get install them; the cluster test will be skipped" >&2
  fi
fi
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest "$@"
