#!/usr/bin/env bash
# System packages qcowfs and its tests need, on Debian (run as root).
set -euo pipefail
pkgs=(
  qemu-utils           # qemu-img, qemu-io: the oracle in tests
  qemu-system-common   # qemu-storage-daemon: the benchmark's peer
  fuse3                # fusermount for unprivileged mounts
  libfuse2             # libfuse.so.2, which the fuse-native transport loads
  e2fsprogs            # mkfs.ext4, e2fsck for loop-mount tests
  util-linux           # losetup, mount, setpriv
  util-linux-extra     # fincore, to see what of a file is in the page cache
  fdisk                # sfdisk, to partition disks in tests
  python3              # lseek SEEK_DATA/SEEK_HOLE probes in tests
  fio                  # benchmark and concurrency tests
  strace               # tests watch what the daemon asks of the kernel
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "qcowfs: these packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
