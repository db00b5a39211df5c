#!/usr/bin/env bash
# Builds the realistic benchmark base VM of cloudlet-overlay from Debian packages (nothing
# binary in git): a Debian 12 minbase root file system (debootstrap) on a 2 GiB ext4 disk,
# 512 MiB of RAM, the demo VM's Debian kernel booted via PVH with a small busybox initramfs
# that mounts the disk as root. apt works in the guest (QEMU user-mode networking reaches the
# mirror), so a benchmark installs a real application from Debian packages into the *resumed*
# base, as a user would.
#   vmlinux      the demo VM's kernel (scripts/demo-vm/build.sh), copied
#   initrd.img   busybox-static + the demo VM's modules + guest/initramfs-init
#   disk.raw     2 GiB ext4: debootstrap --variant=minbase bookworm + guest/rootfs, apt lists
#   bench-vm.json  paths, kernel command line, machine/memory/CPU the snapshots depend on
# into ${CLOUDLET_BENCH_VM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudlet-overlay/bench-vm}.
# Idempotent (a stamp keyed on this script and the guest files); needs root (debootstrap).
# Usage: build.sh [--force] [--print-dir]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${CLOUDLET_BENCH_VM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudlet-overlay/bench-vm}
FORCE=0
for arg in "$@"; do
  case $arg in
    --force) FORCE=1 ;;
    --print-dir) echo "$OUT"; exit 0 ;;
    *) echo "usage: $0 [--force] [--print-dir]" >&2; exit 2 ;;
  esac
done

MACHINE=pc-q35-7.2
MEMORY_MIB=512
CPU_MODEL=qemu64
SMP=1
APPEND='console=ttyS0 panic=-1 quiet'
DISK_SIZE=2G
SUITE=bookworm
MIRROR=${CLOUDLET_DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { echo "bench-vm: $*" >&2; }
die() { echo "bench-vm: error: $*" >&2; exit 1; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec 9<"$OUT"
flock 9

# The demo VM provides kernel, modules and busybox (and is cached the same way).
DEMO_DIR=$(bash "$HERE/../demo-vm/build.sh" --print-dir)
bash "$HERE/../demo-vm/build.sh" >&2

stamp_key() {
  {
    cat "$HERE/build.sh"
    (cd "$HERE/guest" && find . -type f | LC_ALL=C sort)
    (cd "$HERE/guest" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 cat)
    cat "$DEMO_DIR/.stamp"
  } | sha256sum | cut -d' ' -f1
}
KEY=$(stamp_key)
if [[ $FORCE == 0 && -f $OUT/.stamp && $(<"$OUT/.stamp") == "$KEY" ]] &&
  [[ -s $OUT/disk.raw && -s $OUT/initrd.img && -s $OUT/vmlinux && -s $OUT/bench-vm.json ]]; then
  log "up to date in $OUT"
  exit 0
fi

[[ $(id -u) == 0 ]] || die "needs root (debootstrap)"
PATH=$PATH:/usr/sbin:/sbin
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v cpio >/dev/null || need+=(cpio)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

WORK=$(mktemp -d "$OUT/.build.XXXXXX")
cleanup() {
  for m in proc sys dev/pts dev; do umount "$WORK/rootfs/$m" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- root file system ----------------------------------------------------------------------
log "debootstrap $SUITE (minbase) from $MIRROR"
debootstrap --variant=minbase --include=busybox "$SUITE" "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
  { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
cp -a "$HERE/guest/rootfs/." "$WORK/rootfs/"
chmod 755 "$WORK/rootfs/usr/sbin/cloudlet-init" "$WORK/rootfs/www/cgi-bin/status"
echo "deb $MIRROR $SUITE main" >"$WORK/rootfs/etc/apt/sources.list"
echo bench >"$WORK/rootfs/etc/hostname"
# The package lists, as a cloud image that has run apt-get update has them: installing in the
# guest then needs no update (which parses ~80 MB of lists, minutes under TCG).
log "apt-get update in the root file system"
chroot "$WORK/rootfs" apt-get update -qq >&2
chroot "$WORK/rootfs" apt-get clean
rm -f "$WORK/rootfs/var/log/"*.log "$WORK/rootfs/var/cache/ldconfig/aux-cache"

# --- disk ----------------------------------------------------------------------------------
log "making the $DISK_SIZE ext4 disk"
mkfs.ext4 -F -q -b 4096 -L bench -d "$WORK/rootfs" "$WORK/disk.raw" "$DISK_SIZE" >/dev/null

# --- initramfs: the demo VM's, with an init that mounts the Debian root -----------------------
mkdir -p "$WORK/initramfs"
(cd "$WORK/initramfs" && gzip -dc "$DEMO_DIR/initrd.img" | cpio -id --quiet)
rm -rf "$WORK/initramfs/www" "$WORK/initramfs/etc"
install -m 755 "$HERE/guest/initramfs-init" "$WORK/initramfs/init"
find "$WORK/initramfs" -exec touch -h -d @0 {} +
(cd "$WORK/initramfs" && find . -mindepth 1 | LC_ALL=C sort |
  cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -n -6 >"$WORK/initrd.img"
KERNEL=$(sed -n 's/^ *"kernel": "\(.*\)",$/\1/p' "$DEMO_DIR/demo-vm.json")
cp "$KERNEL" "$WORK/vmlinux"

cat >"$WORK/bench-vm.json" <<JSON
{
  "version": 1,
  "dir": "$OUT",
  "kernel": "$OUT/vmlinux",
  "initrd": "$OUT/initrd.img",
  "disk": "$OUT/disk.raw",
  "diskFormat": "raw",
  "append": "$APPEND",
  "machine": "$MACHINE",
  "memoryMiB": $MEMORY_MIB,
  "cpu": "$CPU_MODEL",
  "smp": $SMP,
  "guestPort": 8080,
  "suite": "$SUITE",
  "mirror": "$MIRROR",
  "buildKey": "$KEY"
}
JSON
for f in vmlinux initrd.img disk.raw bench-vm.json; do mv -f "$WORK/$f" "$OUT/$f"; done
echo "$KEY" >"$OUT/.stamp"
log "built in $OUT ($(du -h --apparent-size "$OUT/disk.raw" | cut -f1) disk, $(du -h "$OUT/disk.raw" | cut -f1) used)"
