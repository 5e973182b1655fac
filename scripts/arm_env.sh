#!/usr/bin/env bash
# ARM emulation for tests/e2e/test_arm_emulated.py (issue 12): Debian's qemu-user-static
# registered with binfmt_misc, and an arm64 Debian root with Python 3 and venv.
# Idempotent: tools, registration and the root are reused when present.
#
#   sudo scripts/arm_env.sh [arm64] [armhf]  # prints each root's path when ready
#   EDGEFLEET_ARM64_ROOT=/path               # where the arm64 root lives
#                                            # (default /var/cache/edgefleet-arm/bookworm-arm64)
#   EDGEFLEET_ARMHF_ROOT=/path               # the 32-bit one (armhf: Python 3.11 with
#                                            # python3-numpy and python3-cffi from Debian)
#   EDGEFLEET_DEBIAN_MIRROR=http://...       # default: debootstrap's own
#
# Exit 0: ready. Exit 1: "arm emulation unavailable: <why>" on stderr.
#
# Why the root is made this way: `debootstrap --foreign` only downloads and unpacks the
# base packages (on this machine, about 1 min); the usual second stage then runs some 120
# maintainer scripts under emulation (about 10 min here). Nothing the agent needs
# comes from those scripts, so the packages python3 and python3-venv pull are unpacked
# with dpkg-deb instead; the two account files and the BLAS/LAPACK links the scripts would
# have made are written here.
# /sys is never mounted in the root: the emulated process must see the emulated CPU,
# which it reads from the auxiliary vector (shared/hardware.py), not the host's /sys.
set -euo pipefail

mirror="${EDGEFLEET_DEBIAN_MIRROR:-}"  # empty: debootstrap's default mirror
suite=bookworm
binfmt=/proc/sys/fs/binfmt_misc

unavailable() { echo "arm emulation unavailable: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || unavailable "needs root (apt-get, binfmt_misc, chroot)"
[ "$(uname -s)" = Linux ] || unavailable "needs Linux"

# 1. Tools.
need=()
{ [ -x /usr/bin/qemu-aarch64-static ] && [ -x /usr/bin/qemu-arm-static ]; } \
    || need+=(qemu-user-static)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || unavailable "no apt-get to install ${need[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") \
        >/dev/null || unavailable "apt-get install ${need[*]} failed"
fi

# 2. binfmt_misc: the kernel hands ARM ELF files to qemu-*-static. The F flag of
# Debian's entries opens the interpreter now, so it works inside a chroot as well.
if [ ! -e "$binfmt/register" ]; then
    mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null \
        || unavailable "cannot mount binfmt_misc (a container without CAP_SYS_ADMIN?)"
fi

ready() {  # arch qemu root include expected-machine
    local arch=$1 qemu=$2 root=$3 include=$4 expected=$5
    if [ ! -e "$binfmt/$qemu" ]; then
        grep -v '^#' "/usr/lib/binfmt.d/$qemu.conf" > "$binfmt/register" \
            || unavailable "cannot register $qemu with binfmt_misc"
    fi
    grep -q enabled "$binfmt/$qemu" || unavailable "$binfmt/$qemu is disabled"

    # 3. The root.
    if [ ! -x "$root/usr/bin/python3" ]; then
        local partial="$root.partial"
        rm -rf "$partial"
        mkdir -p "$(dirname "$root")"
        echo "arm_env: debootstrap --foreign $arch $suite into $partial" >&2
        debootstrap --foreign --arch="$arch" --variant=minbase --include="$include" \
            "$suite" "$partial" ${mirror:+"$mirror"} >/dev/null \
            || unavailable "debootstrap failed (is the Debian mirror reachable?)"
        for deb in "$partial"/var/cache/apt/archives/*.deb; do
            dpkg-deb -x "$deb" "$partial"
        done
        # What update-alternatives would link (python3-numpy needs libblas/liblapack).
        for lib in "$partial"/usr/lib/*/blas/libblas.so.3 "$partial"/usr/lib/*/lapack/liblapack.so.3; do
            [ -e "$lib" ] || continue
            ln -sfn "$(basename "$(dirname "$lib")")/$(basename "$lib")" \
                "$(dirname "$(dirname "$lib")")/$(basename "$lib")"
        done
        printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
            > "$partial/etc/passwd"
        printf 'root:x:0:\nnogroup:x:65534:\n' > "$partial/etc/group"
        mkdir -p "$partial/root" "$partial/srv"
        rm -rf "$partial"/var/cache/apt/archives/*.deb "$partial/debootstrap"
        mv "$partial" "$root"
    fi

    # 4. Does it run?
    local machine
    machine=$(chroot "$root" /usr/bin/python3 -c 'import platform, venv, ensurepip
print(platform.machine())' 2>&1) || unavailable "the $arch python3 does not run: $machine"
    [ "$machine" = "$expected" ] || unavailable "the $arch root's python3 reports $machine"
    echo "$arch root ready: $root ($(chroot "$root" /usr/bin/python3 --version), $machine)"
}

[ $# -gt 0 ] || set -- arm64
for arch in "$@"; do
    case "$arch" in
        arm64) ready arm64 qemu-aarch64 \
            "${EDGEFLEET_ARM64_ROOT:-/var/cache/edgefleet-arm/bookworm-arm64}" \
            python3,python3-venv aarch64 ;;
        armhf) ready armhf qemu-arm \
            "${EDGEFLEET_ARMHF_ROOT:-/var/cache/edgefleet-arm/bookworm-armhf}" \
            python3,python3-venv,python3-numpy,python3-cffi armv7l ;;
        *) echo "usage: $0 [arm64] [armhf]" >&2; exit 2 ;;
    esac
done
