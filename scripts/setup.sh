#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system packages, then a virtualenv with polyvisor.
# Usage: bash scripts/setup.sh   (as root, or with sudo available)
set -euo pipefail
cd "$(dirname "$0")/.."

# qemu-utils: qemu-img/qemu-io, the peers tests compare against.
# qemu-system-x86: boots the test guest.  mtools, syslinux, syslinux-common, dosfstools,
# busybox-static, cpio: build the bootable test disk without loop devices.
# libvirt-clients, libxml2-utils: virt-xml-validate (it runs xmllint).
# libvirt-daemon-system, libvirt-daemon-driver-qemu: libvirt's embedded QEMU driver (qemu:///embed).
# libvirt-dev, pkg-config, gcc: build libvirt-python.  ovmf: UEFI guests.
# golang-go, golang-github-vmware-govmomi-dev: build the vcsim simulator the vSphere tests run against.
PACKAGES=(qemu-utils qemu-system-x86 mtools syslinux syslinux-common dosfstools busybox-static cpio
          libvirt-clients libxml2-utils libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-dev
          pkg-config gcc ovmf golang-go golang-github-vmware-govmomi-dev)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A Debian kernel for the boot tests, unpacked from its .deb (never installed into this system).
KERNEL_DIR="${POLYVISOR_KERNEL_DIR:-$PWD/.cache/kernel}"
if [ ! -s "$KERNEL_DIR/vmlinuz" ]; then
    mkdir -p "$KERNEL_DIR/deb"
    (
        cd "$KERNEL_DIR/deb"
        image=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
        [ -n "$image" ] || { echo "setup: cannot find the Debian kernel package" >&2; exit 1; }
        apt-get download -qq "$image" >/dev/null 2>&1 || { apt-get update -qq && apt-get download -qq "$image"; }
        dpkg-deb -x ./*.deb root
        cp root/boot/vmlinuz-* "$KERNEL_DIR/vmlinuz.tmp"
        mv "$KERNEL_DIR/vmlinuz.tmp" "$KERNEL_DIR/vmlinuz"
        rm -rf root ./*.deb
    )
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.polyvisor-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
# Byte-compile polyvisor as a regular pip install would: with PYTHONDONTWRITEBYTECODE set (as on some machines)
# an editable install otherwise recompiles every module on every command (~35 ms per run).
.venv/bin/python -m compileall -q src/polyvisor >/dev/null
