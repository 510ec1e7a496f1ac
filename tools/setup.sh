#!/usr/bin/env bash
# Installs what building replog needs and is missing, on Debian/Ubuntu with
# rustup: a C++ toolchain and libclang (RocksDB's bindings), and the rustfmt
# and clippy components. Safe to run again; does nothing when all is there.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

# Prints "yes" when a libclang that clang-sys (RocksDB's bindgen) can load is
# under root $1 ("" for /), else "no". clang-sys looks for libclang.so,
# libclang-*.so, libclang.so.* and libclang-*.so.* in LIBCLANG_PATH, the
# linker's directories and /usr/lib/llvm-*/lib. libclang-cpp.so.* is a
# different library (the C++ API) and does not count: Debian 12 ships it
# without libclang, and a build that takes it for libclang fails in clang-sys.
libclang_present() {
  local root="$1" dir f base
  local dirs=("$root/usr/lib" "$root/usr/lib64" "$root/lib" "$root/usr/local/lib"
              "$root/usr/lib/x86_64-linux-gnu" "$root/lib/x86_64-linux-gnu"
              "$root/usr/lib/aarch64-linux-gnu" "$root/lib/aarch64-linux-gnu")
  [ -n "${LIBCLANG_PATH:-}" ] && [ -z "$root" ] && dirs+=("$LIBCLANG_PATH")
  for dir in "$root"/usr/lib/llvm-*/lib "$root"/usr/lib/llvm/*/lib; do dirs+=("$dir"); done
  for dir in "${dirs[@]}"; do
    [ -d "$dir" ] || continue
    for f in "$dir"/libclang.so "$dir"/libclang-*.so "$dir"/libclang.so.* "$dir"/libclang-*.so.*; do
      [ -e "$f" ] || continue
      base="${f##*/}"
      case "$base" in libclang-cpp*) continue ;; esac
      echo yes
      return
    done
  done
  echo no
}

# `setup.sh --libclang-present ROOT`: only the detection, for its CI check.
if [ "${1:-}" = "--libclang-present" ]; then
  libclang_present "${2:-}"
  exit 0
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    log "cargo not found: install Rust with rustup (https://rustup.rs) and run again"
    exit 1
  fi
fi

need=()
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
command -v iptables >/dev/null 2>&1 || need+=(iptables) # replog-faults: partitions and packet loss in namespaces
command -v ip >/dev/null 2>&1 || need+=(iproute2)     # replog-faults: network namespaces (absent from minimal images)
if [ "$(libclang_present "${REPLOG_SETUP_ROOT:-}")" = no ]; then
  need+=(libclang-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]} (RocksDB is built from source and needs them)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { log "need root or sudo to apt-get install ${need[*]}"; exit 1; }
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if command -v rustup >/dev/null 2>&1; then
  # Read the whole list first: under pipefail, `rustup ... | grep -q` fails
  # when grep exits before rustup has written its last line.
  installed_components=$(rustup component list --installed 2>/dev/null || true)
  for c in rustfmt clippy; do
    grep -q "^$c" <<<"$installed_components" || {
      log "adding rustup component $c"
      rustup component add "$c" >/dev/null
    }
  done
fi
