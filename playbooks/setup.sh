#!/usr/bin/env bash
# Installs everything weft and its tests need on Debian 12, as root; safe to re-run.
#   system packages: iptables, ipset, iproute2 (the data plane), bird2 (BGP), bpftool and
#     python3-bpfcc (eBPF), conntrack, python3-venv, openssl (the tests' TLS certificates)
#   kernel headers for bcc: the running kernel's own when installed, else the nearest Debian
#     linux-headers linked as /lib/modules/$(uname -r)/build (tc programs use only uapi headers)
#   .venv: made from Debian's /usr/bin/python3 with --system-site-packages, because bcc is
#     Debian's python3-bpfcc (the PyPI package named "bcc" is an unrelated project), then
#     weft installed in it from its wheel (as users install it, not editable), with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (weft programs the kernel; the tests create network namespaces)" >&2
  exit 1
fi

packages=(iptables ipset iproute2 bird2 bpftool python3-bpfcc conntrack python3-venv python3-pip containernetworking-plugins openssl)
kernel="$(uname -r)"
if [ ! -e "/lib/modules/$kernel/build" ]; then
  packages+=(linux-headers-amd64)        # only needed when the running kernel has no headers of its own
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles weft's eBPF programs against /lib/modules/$(uname -r)/build. A kernel without its
# headers package (a VM's custom kernel) gets the nearest installed Debian headers: the newest not
# newer than the running kernel, else the oldest newer one. Said out loud, never done silently.
if [ ! -e "/lib/modules/$kernel/build" ]; then
  mapfile -t arch_dirs < <(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V)
  chosen=""
  for dir in "${arch_dirs[@]}"; do
    version="${dir#/usr/src/linux-headers-}"
    if [ "$(printf '%s\n%s\n' "$version" "$kernel" | sort -V | head -n1)" = "$version" ]; then
      chosen="$dir"                      # not newer than the running kernel: keep the newest such
    elif [ -z "$chosen" ]; then
      chosen="$dir"; break               # all are newer: the oldest of them
    fi
  done
  if [ -z "$chosen" ]; then
    echo "setup.sh: no kernel headers for $kernel and no linux-headers-*-amd64 installed: bcc cannot compile" >&2
    exit 1
  fi
  common="${chosen%-amd64}-common"
  mkdir -p "/lib/modules/$kernel"
  ln -sfn "$chosen" "/lib/modules/$kernel/build"
  if [ -d "$common" ]; then ln -sfn "$common" "/lib/modules/$kernel/source"; fi
  echo "setup.sh: kernel $kernel has no headers; linked the nearest, $(basename "$chosen"), as /lib/modules/$kernel/build"
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
# A wheel, as users get it: the checkout's folders are installed under the `weft` namespace, the
# BIRD templates as package data, bytecode compiled by pip.
# setuptools builds in ./build: a module deleted from the checkout must not live on in it.
rm -rf build
.venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps .
.venv/bin/python -m pip install -q --disable-pip-version-check '.[test]'
echo "setup.sh: ready (.venv/bin/weft)"
