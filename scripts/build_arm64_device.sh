#!/bin/sh
# Build an emulated arm64 Linux "device" in ROOTFS_DIR, runnable on an x86 host without binfmt_misc:
#   1. debootstrap --foreign a minimal Debian bookworm arm64 (python3, libstdc++6), then dpkg -x every
#      downloaded .deb (the second stage would need to run arm64 code as root in a chroot: not needed);
#   2. aarch64 wheels of apache-tvm (+ the RPC server's needs) via the host's pip into ROOTFS/opt/site;
#   3. ROOTFS/opt/bin/python3: a host shell script that runs the arm64 python3.11 under
#      qemu-aarch64-static -L ROOTFS, with argv[0] set to itself so sys.executable is the wrapper (TVM's RPC
#      server re-executes sys.executable for its workers).
# Use it as the "python" of a device's server command, e.g. over SSH to this host:
#   ROOTFS/opt/bin/python3 -m tvm.exec.rpc_server --host 127.0.0.1 --port 9090
# Emulated timings are ~6x native and not proportional to real ARM: they prove the path, never numbers.
# Idempotent: each step is skipped when its result is there. About 35 s and 600 MB from a warm cache.
set -eu
[ $# -eq 1 ] || { echo "usage: $0 ROOTFS_DIR" >&2; exit 2; }
ROOTFS=$(mkdir -p "$1" && cd "$1" && pwd)
PY=${PYTHON:-python3}
TVM_VERSION=${TVM_VERSION:-0.27.0.post1}
TVM_FFI_VERSION=${TVM_FFI_VERSION:-0.1.14.post1}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
for tool in qemu-aarch64-static debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || {
        echo "missing $tool: apt-get install -y qemu-user-static debootstrap (or run .ci/install-remote.sh)" >&2; exit 1; }
done
PATH=$PATH:/usr/sbin

if [ ! -x "$ROOTFS/usr/bin/python3.11" ]; then
    echo "[1/3] debootstrap arm64 bookworm into $ROOTFS"
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,libstdc++6 bookworm "$ROOTFS" "$MIRROR" >/dev/null
    for deb in "$ROOTFS"/var/cache/apt/archives/*.deb; do
        dpkg -x "$deb" "$ROOTFS"
    done
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb
fi

if [ ! -d "$ROOTFS/opt/site/tvm" ]; then
    echo "[2/3] aarch64 wheels (apache-tvm $TVM_VERSION) into $ROOTFS/opt/site"
    "$PY" -m pip install --quiet --disable-pip-version-check --target "$ROOTFS/opt/site" \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
        --python-version 3.11 --implementation cp --abi cp311 --only-binary=:all: \
        "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" psutil cloudpickle tornado
fi

echo "[3/3] wrapper $ROOTFS/opt/bin/python3"
mkdir -p "$ROOTFS/opt/bin"
cat > "$ROOTFS/opt/bin/python3" <<WRAP
#!/bin/sh
# arm64 python3.11 of $ROOTFS under qemu user-mode emulation (written by build_arm64_device.sh)
ROOTFS="$ROOTFS"
export PYTHONPATH="\$ROOTFS/opt/site\${PYTHONPATH:+:\$PYTHONPATH}"
export TVM_USE_RUNTIME_LIB="\${TVM_USE_RUNTIME_LIB:-1}"
exec qemu-aarch64-static -L "\$ROOTFS" -0 "\$0" "\$ROOTFS/usr/bin/python3.11" "\$@"
WRAP
chmod +x "$ROOTFS/opt/bin/python3"
"$ROOTFS/opt/bin/python3" -c "import platform, tvm; print('arm64 device ready:', platform.machine(), 'tvm', tvm.__version__)"
