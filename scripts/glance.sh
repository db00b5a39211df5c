#!/usr/bin/env bash
# A standalone OpenStack Glance (image service, REST API v2) on 127.0.0.1 for the tests, CI and
# trying `cloudlet-overlay base push` & co. by hand. Not a mock: Debian's glance-api, with a
# config of our own (no keystone, sqlite, the file store, sha256 as os_hash_value).
#
#   scripts/glance.sh install                  apt-get install glance-api, only when missing
#   scripts/glance.sh start --dir DIR [--port PORT] [--timeout SECS]
#                                              config + db in DIR, start, wait for /versions,
#                                              print the endpoint URL on stdout
#   scripts/glance.sh stop --dir DIR           stop the glance-api started in DIR
#
# start refuses a port that something already listens on: glance-api binds with SO_REUSEPORT,
# so a second instance on a busy port would start silently and share (or steal) its requests.
# Everything lives in DIR (config, sqlite db, image files, log, pid): remove DIR to forget it.
set -euo pipefail

die() {
  echo "glance.sh: $*" >&2
  exit 1
}

have_glance() {
  dpkg-query -W -f='${Status}' glance-api 2>/dev/null | grep -q 'install ok installed' &&
    command -v glance-api >/dev/null
}

cmd_install() {
  if have_glance; then return 0; fi
  local sudo=
  if [[ $(id -u) != 0 ]]; then sudo=sudo; fi
  echo "glance.sh: installing glance-api (apt, ~1-2 min)" >&2
  local t0=$SECONDS
  # Package lists may be missing on a fresh machine, or too old to have the current version.
  if ! apt-cache policy glance-api 2>/dev/null | grep -q 'Candidate: [0-9]'; then $sudo apt-get update -qq; fi
  # policy-rc.d (where present) keeps the packaged service from starting on port 9292; ours
  # never uses that service anyway.
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends glance-api)
  $sudo "${apt[@]}" >/dev/null || { $sudo apt-get update -qq && $sudo "${apt[@]}" >/dev/null; }
  have_glance || die "glance-api did not install"
  echo "glance.sh: glance-api installed in $((SECONDS - t0)) s" >&2
}

port_busy() {
  # Any listener on the port, on any address (ss), or anything that accepts on 127.0.0.1.
  if command -v ss >/dev/null; then
    [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]] && return 0
  fi
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port() {
  local p
  for _ in 1 2 3 4 5; do
    # The kernel's pick of a free port (glance-api's python3 is there anyway).
    p=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    port_busy "$p" || { echo "$p"; return 0; }
  done
  die "no free port found"
}

# True when PID is the glance-api running from DIR (not another process that reused the pid).
ours() {
  local pid=$1 dir=$2
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "glance-api --config-file $dir/glance-api.conf"
}

write_config() {
  local dir=$1 port=$2
  mkdir -p "$dir/images" "$dir/staging" "$dir/lock" "$dir/cache"
  cat >"$dir/policy.yaml" <<'EOF'
# Standalone glance: every request runs as the unauthenticated admin context; allow public images.
"publicize_image": ""
EOF
  cat >"$dir/glance-api.conf" <<EOF
[DEFAULT]
bind_host = 127.0.0.1
bind_port = $port
# One process (green threads): one pid to stop, nothing forked.
workers = 0
hashing_algorithm = sha256
log_file = $dir/glance-api.log
use_stderr = false
image_cache_dir = $dir/cache
node_staging_uri = file://$dir/staging
enabled_import_methods = [glance-direct]

[database]
connection = sqlite:///$dir/glance.sqlite

[glance_store]
stores = file, http
default_store = file
filesystem_store_datadir = $dir/images

[oslo_concurrency]
lock_path = $dir/lock

[oslo_policy]
policy_file = $dir/policy.yaml

[paste_deploy]
# Empty flavor: the pipeline without keystone (unauthenticated-context).
flavor =
config_file = /etc/glance/glance-api-paste.ini
EOF
}

cmd_start() {
  local dir= port= timeout=60
  while (($#)); do
    case $1 in
      --dir) dir=$2; shift 2 ;;
      --port) port=$2; shift 2 ;;
      --timeout) timeout=$2; shift 2 ;;
      *) die "start: unknown argument $1" ;;
    esac
  done
  [[ -n $dir ]] || die "start: --dir DIR is required"
  have_glance || die "glance-api is not installed (run: scripts/glance.sh install)"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [[ -f $dir/glance-api.pid ]] && ours "$(cat "$dir/glance-api.pid")" "$dir"; then
    die "a glance-api already runs from $dir (pid $(cat "$dir/glance-api.pid")): stop it first"
  fi
  [[ -n $port ]] || port=$(free_port)
  if port_busy "$port"; then
    die "port $port on 127.0.0.1 is in use (glance-api binds with SO_REUSEPORT: refusing to share it)"
  fi
  write_config "$dir" "$port"
  if [[ ! -f $dir/glance.sqlite ]]; then
    if ! glance-manage --config-file "$dir/glance-api.conf" db_sync >"$dir/db_sync.log" 2>&1; then
      rm -f "$dir/glance.sqlite"
      tail -5 "$dir/db_sync.log" >&2
      die "glance-manage db_sync failed (log: $dir/db_sync.log)"
    fi
  fi
  glance-api --config-file "$dir/glance-api.conf" </dev/null >"$dir/glance-api.out" 2>&1 &
  local pid=$!
  echo "$pid" >"$dir/glance-api.pid"
  local url="http://127.0.0.1:$port"
  local deadline=$((SECONDS + timeout))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$dir/glance-api.pid"
      tail -5 "$dir/glance-api.out" "$dir/glance-api.log" 2>/dev/null >&2 || true
      die "glance-api exited during start (log: $dir/glance-api.log)"
    fi
    if curl -fsS -m 2 -o /dev/null "$url/versions" 2>/dev/null; then
      # The one answering must be ours: the only listener on the port is our pid.
      local owners
      owners=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | sort -u | tr '\n' ' ')
      if [[ -n $owners && $owners != "pid=$pid " ]]; then
        kill "$pid" 2>/dev/null || true
        rm -f "$dir/glance-api.pid"
        die "port $port is shared with another process ($owners): stopped ours"
      fi
      echo "$url" >"$dir/endpoint"
      echo "$url"
      return 0
    fi
    sleep 0.3
  done
  kill "$pid" 2>/dev/null || true
  rm -f "$dir/glance-api.pid"
  die "glance-api did not answer $url/versions within $timeout s (log: $dir/glance-api.log)"
}

cmd_stop() {
  local dir=
  while (($#)); do
    case $1 in
      --dir) dir=$2; shift 2 ;;
      *) die "stop: unknown argument $1" ;;
    esac
  done
  [[ -n $dir ]] || die "stop: --dir DIR is required"
  [[ -d $dir ]] || return 0
  dir=$(cd "$dir" && pwd)
  local pidfile=$dir/glance-api.pid
  [[ -f $pidfile ]] || return 0
  local pid
  pid=$(cat "$pidfile")
  if ours "$pid" "$dir"; then
    kill -TERM "$pid" 2>/dev/null || true
    # Until it is gone (or a zombie: its sockets are closed by then), at most 5 s.
    local state
    for _ in $(seq 1 50); do
      state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
      [[ -n $state && $state != Z && $state != X ]] || break
      sleep 0.1
    done
    if ours "$pid" "$dir"; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$pidfile"
}

case ${1:-} in
  install) shift; cmd_install "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) die "usage: glance.sh install | start --dir DIR [--port PORT] [--timeout SECS] | stop --dir DIR" ;;
esac
