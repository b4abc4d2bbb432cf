#!/usr/bin/env bash
# Installs what the benchmarks need beyond a Rust toolchain: rsync (benches/filesync.rs
# runs an rsync daemon on loopback as its baseline). Idempotent: does nothing when the
# tools are already there. Needs root (or sudo) to install.
set -euo pipefail

missing=()
command -v rsync >/dev/null 2>&1 || missing+=(rsync)

if [ "${#missing[@]}" -eq 0 ]; then
    echo "bench-deps: nothing to install (rsync: $(command -v rsync))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "bench-deps: please install: ${missing[*]} (no apt-get here)" >&2
    exit 1
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "bench-deps: need root to install ${missing[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update
"${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
echo "bench-deps: installed ${missing[*]}"
