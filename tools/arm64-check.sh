#!/usr/bin/env bash
# Run the device checker on onnxruntime's aarch64 build, emulated (set up by tools/arm64-env.sh).
#
#   tools/arm64-check.sh QEMU_CPU DIR [check options...]      e.g. tools/arm64-check.sh cortex-a72 artifacts --json r.json
#
# QEMU_CPU: cortex-a72 (NEON), neoverse-n1 (dot product), 'max,sve=off' (i8mm), max (SVE). The edgeq
# package and DIR are copied into the rootfs (no bind mounts: in particular never the host's /sys,
# whose x86 topology crashes onnxruntime's cpuinfo at import), the checker runs there in a clean
# environment, a --json report is copied back to the host path given, and the copy is removed.
# Exit status: the checker's. Timings under emulation mean nothing; the kernels' results are exact.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
root="${ARM64_ROOTFS:-$here/.arm64/rootfs}"
python=/opt/edgeq-device/bin/python
[ $# -ge 2 ] || { echo "usage: $0 QEMU_CPU DIR [check options...]" >&2; exit 2; }
cpu="$1"; dir="$2"; shift 2
[ -f "$root/.edgeq-arm64-ready" ] || { echo "arm64-check: no arm64 environment at $root; run \`make arm64\` first" >&2; exit 2; }
[ -f "$dir/manifest.json" ] || { echo "arm64-check: $dir: no manifest.json; pass an export folder" >&2; exit 2; }
stage="$(mktemp -d "$root/tmp/edgeq-check.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
inside="/tmp/$(basename "$stage")"
mkdir -p "$stage/src"
cp -r "$here/edgeq" "$stage/src/edgeq"
find "$stage/src" -name __pycache__ -prune -exec rm -rf {} +
cp -r "$dir" "$stage/bundle"
args=(); json_host=""
while [ $# -gt 0 ]; do
    case "$1" in
        --json) json_host="$2"; args+=(--json "$inside/report.json"); shift 2 ;;
        --public-key) cp "$2" "$stage/key.pem"; args+=(--public-key "$inside/key.pem"); shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
rc=0
chroot_bin="$(command -v chroot)"
env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 PYTHONPATH="$inside/src" PYTHONDONTWRITEBYTECODE=1 QEMU_CPU="$cpu" \
    "$chroot_bin" "$root" "$python" -m edgeq.device check "$inside/bundle" "${args[@]}" || rc=$?
if [ -n "$json_host" ] && [ -f "$stage/report.json" ]; then cp "$stage/report.json" "$json_host"; fi
exit $rc
