#!/usr/bin/env bash
# ARM emulation for tests/e2e/test_arm_emulated.py (issue 12): Debian's qemu-user-static
# registered with binfmt_misc, and an arm64 Debian root with Python 3 and venv.
# Idempotent: tools, registration and the root are reused when present.
#
#   sudo scripts/arm_env.sh                  # prints the root's path when ready
#   EDGEFLEET_ARM64_ROOT=/path               # where the root lives
#                                            # (default /var/cache/edgefleet-arm/bookworm-arm64)
#   EDGEFLEET_DEBIAN_MIRROR=http://...       # default: debootstrap's own
#
# Exit 0: ready. Exit 1: "arm emulation unavailable: <why>" on stderr.
#
# Why the root is made this way: `debootstrap --foreign` only downloads and unpacks the
# base packages (on this machine, about 1 min); the usual second stage then runs some 120
# maintainer scripts under emulation (about 10 min here). Nothing the agent needs
# comes from those scripts, so the packages python3 and python3-venv pull are unpacked
# with dpkg-deb instead, and the two account files they would have made are written here.
# /sys is never mounted in the root: the emulated process must see the emulated CPU,
# which it reads from the auxiliary vector (shared/hardware.py), not the host's /sys.
set -euo pipefail

root="${EDGEFLEET_ARM64_ROOT:-/var/cache/edgefleet-arm/bookworm-arm64}"
mirror="${EDGEFLEET_DEBIAN_MIRROR:-}"  # empty: debootstrap's default mirror
suite=bookworm
binfmt=/proc/sys/fs/binfmt_misc

unavailable() { echo "arm emulation unavailable: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || unavailable "needs root (apt-get, binfmt_misc, chroot)"
[ "$(uname -s)" = Linux ] || unavailable "needs Linux"

# 1. Tools.
need=()
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || unavailable "no apt-get to install ${need[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") \
        >/dev/null || unavailable "apt-get install ${need[*]} failed"
fi

# 2. binfmt_misc: the kernel hands arm64 ELF files to qemu-aarch64-static. The F flag of
# Debian's entry opens the interpreter now, so it works inside the chroot as well.
if [ ! -e "$binfmt/register" ]; then
    mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null \
        || unavailable "cannot mount binfmt_misc (a container without CAP_SYS_ADMIN?)"
fi
if [ ! -e "$binfmt/qemu-aarch64" ]; then
    grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf > "$binfmt/register" \
        || unavailable "cannot register qemu-aarch64 with binfmt_misc"
fi
grep -q enabled "$binfmt/qemu-aarch64" || unavailable "$binfmt/qemu-aarch64 is disabled"

# 3. The arm64 root.
if [ ! -x "$root/usr/bin/python3" ]; then
    partial="$root.partial"
    rm -rf "$partial"
    mkdir -p "$(dirname "$root")"
    echo "arm_env: debootstrap --foreign arm64 $suite into $partial" >&2
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,python3-venv \
        "$suite" "$partial" ${mirror:+"$mirror"} >/dev/null \
        || unavailable "debootstrap failed (is the Debian mirror reachable?)"
    for deb in "$partial"/var/cache/apt/archives/*.deb; do
        dpkg-deb -x "$deb" "$partial"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
        > "$partial/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$partial/etc/group"
    mkdir -p "$partial/root" "$partial/srv"
    rm -rf "$partial"/var/cache/apt/archives/*.deb "$partial/debootstrap"
    mv "$partial" "$root"
fi

# 4. Does it run?
machine=$(chroot "$root" /usr/bin/python3 -c 'import platform, venv, ensurepip
print(platform.machine())' 2>&1) || unavailable "the arm64 python3 does not run: $machine"
[ "$machine" = aarch64 ] || unavailable "the root's python3 reports $machine, not aarch64"
echo "arm64 root ready: $root ($(chroot "$root" /usr/bin/python3 --version), qemu $(
    /usr/bin/qemu-aarch64-static --version | head -1 | awk '{print $3}'))"
