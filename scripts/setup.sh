#!/usr/bin/env bash
# Installs everything cloudlet-overlay needs on a fresh Debian 12 machine (as root, or with
# sudo): QEMU and qemu-img, the benchmark peers (xdelta3, casync), what the demo VM build uses,
# glance-api (scripts/glance.sh), qemu-guest-agent (a unit test runs its qemu-ga on the host over a
# unix socket, every command that touches the host blocked), then the npm dependencies, and builds.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=
if [[ $(id -u) != 0 ]]; then SUDO=sudo; fi

PKGS=(qemu-system-x86 qemu-utils xdelta3 casync zstd busybox-static e2fsprogs fdisk cpio kmod xz-utils tar nginx-light qemu-guest-agent)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirt (the default launcher when its daemon answers; the service test runs its VMs under it).
# The test starts libvirtd/virtlogd itself when they are not running. SETUP_LIBVIRT=0 skips it.
if [[ ${SETUP_LIBVIRT:-1} != 0 ]]; then
  lv=()
  for p in libvirt-daemon-system libvirt-clients; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || lv+=("$p")
  done
  if ((${#lv[@]})); then
    echo "setup: installing ${lv[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${lv[@]}" >/dev/null
  fi
fi

# Debian's glance-api for the OpenStack end-to-end test (~200 packages, ~1 min; only when missing;
# SETUP_GLANCE=0 skips it, e.g. for the demo).
if [[ ${SETUP_GLANCE:-1} != 0 ]]; then bash scripts/glance.sh install; fi

# zstd-napi is a native addon: without a reachable prebuilt binary, node-gyp builds it against
# Node's headers, which Debian's nodejs ships in /usr/include/node (no download needed).
if [[ -z ${npm_config_nodedir:-} && -f /usr/include/node/node.h ]]; then export npm_config_nodedir=/usr; fi

if [[ ! -d node_modules || package-lock.json -nt node_modules/.package-lock.json ]]; then
  echo "setup: npm ci" >&2
  npm ci --no-audit --no-fund >&2
fi
npm run --silent build >&2
