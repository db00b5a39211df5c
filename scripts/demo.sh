#!/usr/bin/env bash
# The whole cloudlet-overlay flow on this machine, from nothing:
#   setup (apt packages, npm deps, build) → demo base VM from Debian packages → boot it →
#   capture it as a base → launch it with a fresh disk layer → "install an application" in the
#   guest → snapshot → create the overlay → synthesize it → the guest's answer and timings.
# Everything lives in ./.demo (removed at the start of each run). Usage: npm run demo
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

say "setup: system packages, npm dependencies, build"
SETUP_GLANCE=0 bash scripts/setup.sh   # the demo needs no Glance

say "demo base VM: kernel + busybox initramfs + ext4 disk from Debian packages (cached)"
bash scripts/demo-vm/build.sh
DEMO=$(bash scripts/demo-vm/build.sh --print-dir)

WORK=$ROOT/.demo
if [[ -d $WORK/lib/instances ]]; then
  for d in "$WORK"/lib/instances/*/; do
    [[ -d $d ]] && CLOUDLET_LIBRARY=$WORK/lib node bin/cloudlet-overlay.js -q stop "$(basename "$d")" || true
  done
fi
rm -rf "$WORK"
mkdir -p "$WORK"
export CLOUDLET_LIBRARY=$WORK/lib
co() { node "$ROOT/bin/cloudlet-overlay.js" "$@"; }
port() {
  node -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"
}
json() { node -e "let s='';process.stdin.on('data',d=>s+=d).on('end',()=>console.log(JSON.parse(s)$1))"; }

say "boot the base VM under QEMU (any QEMU with a QMP socket will do)"
cp --sparse=always "$DEMO/disk.raw" "$WORK/base-disk.raw"
P0=$(port)
qemu-system-x86_64 -accel tcg -machine pc-q35-7.2 -m 128 -cpu qemu64 -smp 1 -nodefaults -no-user-config \
  -display none -kernel "$DEMO/vmlinux" -initrd "$DEMO/initrd.img" -append 'console=ttyS0 panic=-1 quiet' \
  -serial "file:$WORK/base-serial.log" -drive "file=$WORK/base-disk.raw,format=raw,if=virtio" \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$P0-:8080" -device virtio-net-pci,netdev=n0,romfile= \
  -qmp "unix:$WORK/base-qmp.sock,server=on,wait=off" 2>"$WORK/base-qemu.log" &
QEMU_PID=$!
trap 'kill $QEMU_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -fsS -m 2 "http://127.0.0.1:$P0/cgi-bin/status" >"$WORK/base-status.txt" 2>/dev/null && break
  sleep 0.5
done
cat "$WORK/base-status.txt"

say "capture it into the base library"
co base capture --qmp "$WORK/base-qmp.sock" --name demo --then quit
wait $QEMU_PID 2>/dev/null || true
trap - EXIT
co base list

say "launch the base (resumed, not booted) with a fresh disk layer, to customize it"
P1=$(port)
IID=$(co --json launch demo --customize --forward "$P1:8080" | json .instance)
echo "instance $IID; guest HTTP on 127.0.0.1:$P1"

say "install an application in the guest through its serial console: files on disk, a running process"
APP="echo demo-app-installed > /mnt/marker && mkdir -p /mnt/app && seq 1 100000 > /mnt/app/numbers.txt"
APP+=" && cp /bin/busybox /mnt/app/"
APP+=" && (setsid sh -c 'n=0; while :; do n=\$((n+1)); echo \"demo-app ticks=\$n\" > /tmp/app-state; sleep 1; done'"
APP+=" </dev/null >/dev/null 2>&1 &) && sync"
co console "$IID" --run "$APP" >/dev/null
curl -fsS "http://127.0.0.1:$P1/cgi-bin/status"

say "snapshot the customized VM (memory + disk + VM spec)"
co snapshot --instance "$IID" -o "$WORK/custom" --then quit
co -q stop "$IID"

say "create the overlay: customized VM minus base"
co create --base demo --disk "$WORK/custom/disk.qcow2" --memory "$WORK/custom/memory.stream" -o "$WORK/app.overlay"
ls -l "$WORK/app.overlay"

say "synthesize: base + overlay → running VM, until it answers"
P2=$(port)
co synthesize "$WORK/app.overlay" --base demo --forward "$P2:8080" \
  --wait-http "http://127.0.0.1:$P2/cgi-bin/status" --detach
co ps

say "the same boot token as the base (memory came back), the marker from disk," \
  "and two seconds later the app has ticked on:"
curl -fsS "http://127.0.0.1:$P2/cgi-bin/status"
sleep 2
curl -fsS "http://127.0.0.1:$P2/cgi-bin/status"
for d in "$WORK"/lib/instances/*/; do [[ -d $d ]] && co -q stop "$(basename "$d")"; done
say "done: everything is in $WORK (library in $WORK/lib)"
