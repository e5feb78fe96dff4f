#!/usr/bin/env bash
# An emulated arm64 Debian with numpy and onnxruntime's aarch64 build, for `edgeq.device check` on
# ARM kernels from an x86 machine (QEMU_CPU=cortex-a72 | neoverse-n1 | max,sve=off | max).
#
#   tools/arm64-env.sh [ROOTFS]        default: .arm64/rootfs beside this folder; needs root
#
# Idempotent: each step is skipped when its result is already there, so a re-run takes about a second.
# Versions: ORT_VERSION and NUMPY_VERSION (the Makefile passes pyproject.toml's onnxruntime pin and the
# build venv's numpy). Nothing is installed under emulation: mmdebstrap unpacks Debian's arm64 python3
# and the libraries it and the wheels need (no maintainer scripts run), and the host's pip downloads the
# aarch64 wheels (pip --platform) and installs them into the rootfs venv (pip --target): about 30 s in
# all, where a debootstrap and an emulated pip took 3 minutes. The host's /sys is never bound into the
# rootfs: onnxruntime's cpuinfo reads the x86 topology there and crashes at import.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
root="${1:-$here/.arm64/rootfs}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ort="${ORT_VERSION:?set ORT_VERSION (the onnxruntime version to install)}"
np="${NUMPY_VERSION:?set NUMPY_VERSION (the numpy version to install)}"
venv=/opt/edgeq-device
stamp="$root/.edgeq-arm64-ready"
want="suite=$suite onnxruntime=$ort numpy=$np"
t0=$(date +%s)

say() { echo "arm64-env: $*"; }
# Where emulation cannot run at all (not root, binfmt_misc refused), say why in one line and stop:
# tests/test_arm.py then skips with that reason. Under CI (CI set) it is an error instead.
cannot() {
    if [ -n "${CI:-}" ]; then echo "arm64-env: $*" >&2; exit 1; fi
    echo "arm64-env: skipped: $*" >&2; exit 0
}
[ "$(id -u)" = 0 ] || cannot "needs root (apt-get, mmdebstrap, chroot); run \`sudo make arm64\`"

# 1. qemu-user-static and mmdebstrap (with arch-test, its check of a foreign architecture) from Debian's archive
packages="qemu-user-static mmdebstrap arch-test"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v arch-test >/dev/null; then
    say "installing $packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends $packages >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $packages >/dev/null; }
fi

# 2. aarch64 binaries run through qemu: binfmt_misc mounted and qemu-aarch64 registered with the F flag
#    (the interpreter is opened at registration, so chroot needs no copy of it inside the rootfs)
bm=/proc/sys/fs/binfmt_misc
if [ ! -e "$bm/register" ]; then
    mount -t binfmt_misc binfmt_misc "$bm" 2>/dev/null || cannot "cannot mount binfmt_misc at $bm (a container without that privilege)"
fi
if [ ! -e "$bm/qemu-aarch64" ]; then
    conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [ -f "$conf" ] || { echo "arm64-env: $conf missing; reinstall qemu-user-static" >&2; exit 2; }
    # the conf names Debian's argv[0]-preserving wrapper (/usr/libexec/qemu-binfmt/...-P); register the
    # static binary itself, which works in any chroot
    line="$(sed -n 's/^\(:qemu-aarch64:[^:]*:[^:]*:[^:]*:[^:]*:\)[^:]*:\(.*\)$/\1\/usr\/bin\/qemu-aarch64-static:\2/p' "$conf")"
    # flags: O (credentials), F (opened now); no P: qemu-aarch64-static itself does not take argv[0] apart
    line="${line%:*}:OF"
    printf '%s' "$line" > "$bm/register"
    say "registered qemu-aarch64 in binfmt_misc"
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "ready: $root ($want), checked in $(( $(date +%s) - t0 )) s"
    exit 0
fi

# 3. Debian's arm64 python3 (with venv) and libstdc++ (the wheels' C++ runtime), with what they depend on,
#    unpacked without running a maintainer script (mmdebstrap's extract variant): no emulated dpkg
if [ ! -x "$root/usr/bin/python3" ] || [ ! -f "$root/.edgeq-base-done" ]; then
    say "unpacking Debian $suite arm64 python3 into $root"
    rm -rf "$root"
    mkdir -p "$(dirname "$root")"
    mmdebstrap --variant=extract --architectures=arm64 --include=python3,python3-venv,libstdc++6 "$suite" "$root" \
        "$mirror" >"$root.mmdebstrap.log" 2>&1 \
        || { tail -20 "$root.mmdebstrap.log" >&2; echo "arm64-env: mmdebstrap failed (log: $root.mmdebstrap.log)" >&2; exit 1; }
    mkdir -p "$root/tmp" "$root/proc"
    chmod 1777 "$root/tmp"
    touch "$root/.edgeq-base-done"
fi

# 4. numpy and onnxruntime aarch64 wheels (with their dependencies), downloaded and installed by the
#    host's pip into a venv inside (its python is the rootfs's: the same 3.x as --python-version)
pyver="$(chroot "$root" /usr/bin/python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
wheels="$root/opt/wheels"
mkdir -p "$wheels"
say "downloading aarch64 wheels for python $pyver: onnxruntime==$ort numpy==$np"
pip="${PIP:-python3 -m pip}"
platforms=(--platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64
           --platform manylinux_2_17_aarch64 --platform linux_aarch64)
$pip download -q --disable-pip-version-check -d "$wheels" --only-binary=:all: --python-version "$pyver" \
    "${platforms[@]}" "onnxruntime==$ort" "numpy==$np" 2>&1 | grep -v "^WARNING: Location" || true
ls "$wheels"/onnxruntime-"$ort"-*.whl >/dev/null 2>&1 || { echo "arm64-env: no aarch64 wheel of onnxruntime $ort for python $pyver" >&2; exit 1; }
say "installing them into $venv inside the rootfs"
rm -rf "${root:?}$venv"
chroot "$root" /usr/bin/python3 -m venv --without-pip "$venv"
$pip install -q --disable-pip-version-check --no-index --find-links "$wheels" --only-binary=:all: \
    --python-version "$pyver" --implementation cp "${platforms[@]}" --target "$root$venv/lib/python$pyver/site-packages" \
    "onnxruntime==$ort" "numpy==$np" 2>&1 | grep -v "^WARNING: Location" || true
QEMU_CPU=cortex-a72 chroot "$root" "$venv/bin/python" -c "import numpy, onnxruntime; print('arm64-env: numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
echo "$want" > "$stamp"
say "ready: $root ($want), set up in $(( $(date +%s) - t0 )) s"
