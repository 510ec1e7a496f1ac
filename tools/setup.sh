#!/usr/bin/env bash
# Installs what building replog needs and is missing, on Debian/Ubuntu with
# rustup: a C++ toolchain and libclang (RocksDB's bindings), and the rustfmt
# and clippy components. Safe to run again; does nothing when all is there.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

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
if ! ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so'; then
  ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev clang)
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
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || {
      log "adding rustup component $c"
      rustup component add "$c" >/dev/null
    }
  done
fi
