#!/usr/bin/env bash
# meshlite's task runner. On a fresh Debian/Ubuntu machine, as root:
#
#   ./tasks.sh demo     the seed demo (a cluster's services programmed into network
#                       namespaces, reachable by ClusterIP and by DNS name)
#   ./tasks.sh test     every test: formatting, lints, unit, in-process, kernel
#                       (network namespaces), end-to-end, Helm chart, IPVS VM
#
# Each installs the Debian packages it needs when they are missing, and says so.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Debian packages by the command they provide.
declare -A PKG_OF=(
  [iptables]=iptables [ip6tables]=iptables [iptables-restore]=iptables
  [ipset]=ipset [ip]=iproute2 [dig]=dnsutils [conntrack]=conntrack
  [nft]=nftables [curl]=curl [python3]=python3 [make]=make [cc]=gcc
)

need_packages() {
  local missing=()
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKG_OF[$cmd]:-$cmd}")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; run as root so they can be installed"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  say "installing missing packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

need_rust() {
  command -v cargo >/dev/null || die "cargo not found: install Rust 1.89 or newer (https://rustup.rs)"
  # A C compiler for ring, and make for jemalloc (the control plane's allocator).
  need_packages cc make
}

# cargo-machete finds dependencies a crate declares but does not use (stable Rust;
# cargo-udeps needs nightly). Installed from crates.io once, like the packages above.
MACHETE_VERSION=0.9.2
need_machete() {
  if cargo machete --version 2>/dev/null | grep -q "$MACHETE_VERSION"; then return 0; fi
  say "installing cargo-machete $MACHETE_VERSION (unused-dependency check; once, about 3 minutes)"
  cargo install --locked --quiet cargo-machete --version "$MACHETE_VERSION"
}

target_dir() {
  cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])'
}

runtime_tools() {
  need_packages iptables ip6tables iptables-restore ipset ip dig conntrack nft curl python3
}

cmd_test() {
  need_rust
  runtime_tools
  [ "$(id -u)" -eq 0 ] || die "the kernel tests need root (network namespaces, iptables): run as root"
  local started=$SECONDS
  say "cargo fmt --check"
  cargo fmt --all -- --check
  say "cargo clippy (all targets, warnings are errors)"
  cargo clippy --workspace --all-targets --locked -- -D warnings
  need_machete
  say "cargo machete (no unused dependencies)"
  cargo machete
  say "preparing the IPVS test VM (QEMU and a Debian kernel; cached after the first run)"
  tools/ipvs-vm.sh --prepare
  say "building binaries (the tests launch them)"
  cargo build --workspace --bins --locked
  MESHLITE_BIN_DIR="$(target_dir)/debug"
  export MESHLITE_BIN_DIR
  if cargo nextest --version >/dev/null 2>&1; then
    say "cargo nextest run --workspace"
    cargo nextest run --workspace --locked --no-fail-fast
  else
    say "cargo test --workspace (cargo-nextest not installed)"
    cargo test --workspace --locked --no-fail-fast
  fi
  if [ -x helm/tests/run.sh ]; then
    say "Helm chart tests"
    helm/tests/run.sh
  fi
  say "all tests passed in $((SECONDS - started))s"
}

cmd_demo() {
  need_rust
  runtime_tools
  [ "$(id -u)" -eq 0 ] || die "the demo needs root (network namespaces, iptables): run as root"
  say "building release binaries (first time: a few minutes)"
  cargo build --release --workspace --bins --locked
  local bin; bin="$(target_dir)/release"
  MESHLITE_BIN_DIR="$bin" exec "$bin/demo" "$@"
}

case "${1:-}" in
  test) shift; cmd_test "$@" ;;
  demo) shift; cmd_demo "$@" ;;
  *) echo "usage: $0 demo|test" >&2; exit 2 ;;
esac
