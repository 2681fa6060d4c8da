#!/usr/bin/env bash
# Set up latprof in ./.venv on a fresh machine. `--test` also installs the test tools (pytest, and the
# system packages the remote-device tests drive for real: sshd, qemu-user, the aarch64 cross compiler, adb).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch 2.14.1 + torchvision 0.29.1 (timm needs torchvision) are the pair available offline on our
# machines; pinning them here keeps pip from fetching a newer multi-GB build.
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
extras=all
if [ "${1:-}" = "--test" ]; then
    extras=all,test
    if [ "$(id -u)" = 0 ]; then bash .ci/install-remote.sh; else sudo bash .ci/install-remote.sh; fi
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[$extras]"
echo "latprof installed in .venv ($(.venv/bin/latprof --version))"
