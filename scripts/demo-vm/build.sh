#!/usr/bin/env bash
# Builds the demo base VM of cloudlet-overlay from Debian packages, with no binaries in git:
#   vmlinuz      Debian's linux-image-6.1.0-*-amd64 kernel (downloaded, never installed)
#   vmlinux      the same kernel uncompressed, booted via PVH (what demo-vm.json's "kernel" names)
#   initrd.img   busybox-static + virtio/ext4 modules + scripts/demo-vm/guest/rootfs
#   disk.raw     64 MiB ext4 made from scripts/demo-vm/guest/disk (mkfs.ext4 -d, no mount)
#   demo-vm.json absolute paths, kernel command line and the QEMU machine args the guest expects
# into ${CLOUDLET_DEMO_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudlet-overlay/demo-vm}.
#
# Idempotent: a stamp keyed on a hash of this script and the guest files makes a second run a
# no-op that touches nothing. Installs the Debian tools it lacks (needs root for that).
# Usage: build.sh [--force] [--print-dir]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${CLOUDLET_DEMO_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudlet-overlay/demo-vm}
FORCE=0
for arg in "$@"; do
  case $arg in
    --force) FORCE=1 ;;
    --print-dir) echo "$OUT"; exit 0 ;;
    *) echo "usage: $0 [--force] [--print-dir]" >&2; exit 2 ;;
  esac
done

# What the guest expects from QEMU: the snapshot only resumes on the same machine/memory/CPU.
MACHINE=pc-q35-7.2
MEMORY_MIB=128
CPU_MODEL=qemu64
SMP=1
APPEND='console=ttyS0 panic=-1 quiet'
GUEST_PORT=8080
DISK_SIZE=64M
# Modules the guest needs; modprobe --show-depends expands them (deps and softdeps) in order.
ROOT_MODULES=(virtio_pci virtio_blk virtio_net ext4)

log() { echo "demo-vm: $*" >&2; }
die() { echo "demo-vm: error: $*" >&2; exit 1; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# One builder at a time (tests may call this concurrently). Locking the directory itself
# leaves no lock file behind and modifies nothing.
exec 9<"$OUT"
flock 9

stamp_key() {
  {
    cat "$HERE/build.sh"
    # Names and contents only: modes are normalized by the build, and differ between checkouts.
    (cd "$HERE/guest" && find . -type f | LC_ALL=C sort)
    (cd "$HERE/guest" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 cat)
  } | sha256sum | cut -d' ' -f1
}
KEY=$(stamp_key)

outputs_present() {
  local f kernel
  for f in vmlinuz initrd.img disk.raw demo-vm.json; do [[ -s $OUT/$f ]] || return 1; done
  kernel=$(sed -n 's/^ *"kernel": "\(.*\)",$/\1/p' "$OUT/demo-vm.json")
  [[ -n $kernel && -s $kernel ]]
}

if [[ $FORCE == 0 && -f $OUT/.stamp && $(<"$OUT/.stamp") == "$KEY" ]] && outputs_present; then
  log "up to date in $OUT"
  exit 0
fi

# --- tools -------------------------------------------------------------------------------
APT_UPDATED=0
apt_update_once() {
  if [[ $APT_UPDATED == 0 ]]; then
    log "apt-get update"
    apt-get update -qq >&2
    APT_UPDATED=1
  fi
}

need_pkgs=()
command -v dpkg-deb >/dev/null || need_pkgs+=(dpkg)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v depmod >/dev/null || command -v /usr/sbin/depmod >/dev/null || need_pkgs+=(kmod)
command -v xz >/dev/null || need_pkgs+=(xz-utils)
command -v gzip >/dev/null || need_pkgs+=(gzip)
command -v flock >/dev/null || need_pkgs+=(util-linux)
if ((${#need_pkgs[@]})); then
  [[ $(id -u) == 0 ]] || die "missing tools (${need_pkgs[*]}); run as root or install them"
  apt_update_once
  log "installing ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi
PATH=$PATH:/usr/sbin:/sbin

# --- packages ----------------------------------------------------------------------------
# The kernel package name changes with each ABI bump (linux-image-6.1.0-NN-amd64), and the
# mirror keeps only the current one: ask apt what linux-image-amd64 points at today.
resolve_kernel_pkg() {
  local name
  name=$(apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-6\.1\.0-[0-9]*-amd64\)$/\1/p' | head -n1)
  if [[ -z $name ]]; then
    name=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' 2>/dev/null |
      cut -d' ' -f1 | sort -V | tail -n1)
  fi
  echo "$name"
}
KPKG=$(resolve_kernel_pkg)
if [[ -z $KPKG ]] || ! apt-cache show "$KPKG" >/dev/null 2>&1 || ! apt-cache show busybox-static >/dev/null 2>&1; then
  apt_update_once
  KPKG=$(resolve_kernel_pkg)
fi
[[ -n $KPKG ]] || die "no linux-image-6.1.0-*-amd64 package known to apt"

DEBS=$OUT/debs
mkdir -p "$DEBS"
download() { # download PKG: fetches PKG's .deb into $DEBS unless the current version is there
  local pkg=$1 ver file
  ver=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
  [[ -n $ver && $ver != "(none)" ]] || die "apt knows no candidate for $pkg"
  file=$(ls "$DEBS/${pkg}_"*.deb 2>/dev/null | head -n1 || true)
  if [[ -n $file && $(dpkg-deb -f "$file" Version) == "$ver" ]]; then
    echo "$file"
    return
  fi
  rm -f "$DEBS/${pkg}_"*.deb
  log "downloading $pkg $ver"
  # apt's _apt user may not write here: download as root without the sandbox warning.
  (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2)
  file=$(ls "$DEBS/${pkg}_"*.deb | head -n1)
  echo "$file"
}
KDEB=$(download "$KPKG")
BDEB=$(download busybox-static)
KVER_PKG=$(dpkg-deb -f "$KDEB" Version)
BVER_PKG=$(dpkg-deb -f "$BDEB" Version)

WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

log "extracting $KPKG $KVER_PKG and busybox-static $BVER_PKG"
dpkg-deb -x "$KDEB" "$WORK/kernel"
dpkg-deb -x "$BDEB" "$WORK/busybox"
KREL=$(ls "$WORK/kernel/lib/modules")
[[ -f $WORK/kernel/boot/vmlinuz-$KREL ]] || die "no vmlinuz-$KREL in $KPKG"

# --- initramfs ---------------------------------------------------------------------------
ROOT=$WORK/initramfs
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules}
cp -a "$HERE/guest/rootfs/." "$ROOT/"
chmod -R u=rwX,go=rX "$ROOT"
chmod 755 "$ROOT/init" "$ROOT/www/cgi-bin/status"
install -m 755 "$WORK/busybox/bin/busybox" "$ROOT/bin/busybox"
for applet in $("$ROOT/bin/busybox" --list); do
  [[ $applet == busybox ]] || ln -s busybox "$ROOT/bin/$applet"
done
if [[ $(id -u) == 0 ]]; then
  mknod -m 600 "$ROOT/dev/console" c 5 1
fi

# The package ships no modules.dep (depmod runs at install time): make one in the scratch tree.
depmod -b "$WORK/kernel" "$KREL"
: >"$ROOT/lib/modules/load-order"
declare -A seen=()
for m in "${ROOT_MODULES[@]}"; do
  while read -r verb path _; do
    [[ $verb == insmod ]] || continue
    base=$(basename "$path")
    name=${base%%.ko*}
    [[ -z ${seen[$name]:-} ]] || continue
    seen[$name]=1
    case $base in
      *.ko) cp "$path" "$ROOT/lib/modules/$name.ko" ;;
      *.ko.xz) xz -dc "$path" >"$ROOT/lib/modules/$name.ko" ;;
      *.ko.zst) command -v zstd >/dev/null || die "zstd is needed for $base"
        zstd -qdc "$path" >"$ROOT/lib/modules/$name.ko" ;;
      *.ko.gz) gzip -dc "$path" >"$ROOT/lib/modules/$name.ko" ;;
      *) die "unexpected module file $path" ;;
    esac
    echo "$name.ko" >>"$ROOT/lib/modules/load-order"
  done < <(modprobe -d "$WORK/kernel" -S "$KREL" --show-depends "$m")
done
log "modules: $(tr '\n' ' ' <"$ROOT/lib/modules/load-order")"

# Sorted, owner root, fixed mtimes: the same inputs give the same initrd bytes.
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort |
  cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -n -6 >"$WORK/initrd.img"
cp "$WORK/kernel/boot/vmlinuz-$KREL" "$WORK/vmlinuz"

# vmlinux: the same kernel uncompressed, booted by QEMU through its PVH entry point. Under TCG
# the bzImage's own xz decompression takes ~5 s; QEMU loading the ELF takes ~0.1 s. Falls back
# to vmlinuz when the payload is not xz or the ELF has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY).
KERNEL_FILE=vmlinuz
xz_at=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$WORK/vmlinuz" | head -n1 | cut -d: -f1 || true)
if [[ -n $xz_at ]] &&
  xz -dc --single-stream < <(tail -c +$((xz_at + 1)) "$WORK/vmlinuz") >"$WORK/vmlinux" 2>/dev/null &&
  [[ $(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]] &&
  LC_ALL=C grep -qaP '\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00' "$WORK/vmlinux"; then
  KERNEL_FILE=vmlinux
else
  log "no PVH vmlinux could be extracted; booting the compressed vmlinuz (slower under TCG)"
  rm -f "$WORK/vmlinux"
fi

# --- disk ---------------------------------------------------------------------------------
mkdir -p "$WORK/disk"
cp -a "$HERE/guest/disk/." "$WORK/disk/"
chmod -R u=rwX,go=rX "$WORK/disk"
find "$WORK/disk" -exec touch -h -d @1 {} +
# Same inputs → same bytes (a base VM's id is the hash of its disk): fixed UUID, hash seed and
# mkfs clock; inode ctimes (copied from the staging files, not settable by touch) reset below.
# -b 4096 as on any real-sized ext4 (mke2fs picks 1 KiB blocks below 512 MiB): file data then
# sits 4 KiB-aligned on disk, like the page-cache copies of it in memory.
E2FSPROGS_FAKE_TIME=1 mkfs.ext4 -F -q -b 4096 -L demo -U 5e6a2f0c-8d1b-4c3e-9a47-c10d1e70f1a0 \
  -E hash_seed=0b5e1c9a-2f3d-4e6f-8a1b-d3c4e5f60718 -d "$WORK/disk" "$WORK/disk.raw" "$DISK_SIZE" >/dev/null
(cd "$WORK/disk" && find . -mindepth 1 | LC_ALL=C sort | sed 's|^\.\(.*\)|sif "\1" ctime @1|') |
  debugfs -w -f - "$WORK/disk.raw" >/dev/null 2>&1

# --- manifest ----------------------------------------------------------------------------
json_str() { # minimal JSON string escaping for paths and the command line
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}
cat >"$WORK/demo-vm.json" <<EOF
{
  "version": 1,
  "dir": $(json_str "$OUT"),
  "kernel": $(json_str "$OUT/$KERNEL_FILE"),
  "vmlinuz": $(json_str "$OUT/vmlinuz"),
  "initrd": $(json_str "$OUT/initrd.img"),
  "disk": $(json_str "$OUT/disk.raw"),
  "diskFormat": "raw",
  "append": $(json_str "$APPEND"),
  "machine": "$MACHINE",
  "memoryMiB": $MEMORY_MIB,
  "cpu": "$CPU_MODEL",
  "smp": $SMP,
  "guestPort": $GUEST_PORT,
  "guestAddr": "10.0.2.15",
  "qemuArgs": ["-machine", "$MACHINE", "-m", "$MEMORY_MIB", "-cpu", "$CPU_MODEL", "-smp", "$SMP",
               "-nodefaults", "-display", "none"],
  "nic": {"model": "virtio-net-pci", "romfile": ""},
  "diskInterface": "virtio",
  "kernelPackage": "$KPKG",
  "kernelPackageVersion": "$KVER_PKG",
  "kernelRelease": "$KREL",
  "busyboxPackageVersion": "$BVER_PKG",
  "modules": [$(sed 's/.*/"&"/' "$ROOT/lib/modules/load-order" | paste -sd, -)],
  "buildKey": "$KEY"
}
EOF

[[ $KERNEL_FILE == vmlinux ]] || rm -f "$OUT/vmlinux"
for f in vmlinuz $([[ $KERNEL_FILE == vmlinux ]] && echo vmlinux) initrd.img disk.raw demo-vm.json; do
  mv -f "$WORK/$f" "$OUT/$f"
done
echo "$KEY" >"$OUT/.stamp.tmp"
mv -f "$OUT/.stamp.tmp" "$OUT/.stamp"
log "built in $OUT (initrd $(stat -c %s "$OUT/initrd.img") bytes, kernel $KREL)"
