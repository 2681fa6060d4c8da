#!/bin/sh
# System tools the remote-device tests use: a real OpenSSH sshd on loopback, qemu user-mode emulation and
# debootstrap for the emulated arm64 device, the aarch64 cross compiler, and Debian's adb client/server.
# Idempotent and fast when everything is there already: apt-get runs only for what is missing.
set -eu
need=""
have() { command -v "$1" >/dev/null 2>&1; }
have sshd || [ -x /usr/sbin/sshd ] || need="$need openssh-server"
have ssh-keyscan || need="$need openssh-client"
have qemu-aarch64-static || need="$need qemu-user-static"
have debootstrap || [ -x /usr/sbin/debootstrap ] || need="$need debootstrap"
have aarch64-linux-gnu-g++ || need="$need g++-aarch64-linux-gnu"
have adb || need="$need adb"
if [ -n "$need" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need
fi
mkdir -p /run/sshd  # sshd's privilege-separation directory (no systemd creates it here)
echo "remote test tools: sshd $(command -v sshd || echo /usr/sbin/sshd), qemu-aarch64-static, debootstrap, aarch64-linux-gnu-g++, adb present"
