#!/usr/bin/env bash
# Installs everything weft and its tests need on Debian 12, as root; safe to re-run.
#   system packages: iptables, ipset, iproute2 (the data plane), bird2 (BGP), bpftool and
#     python3-bpfcc (eBPF), conntrack, python3-venv, openssl (the tests' TLS certificates)
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
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
# A wheel, as users get it: the checkout's folders are installed under the `weft` namespace, the
# BIRD templates as package data, bytecode compiled by pip.
.venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps .
.venv/bin/python -m pip install -q --disable-pip-version-check '.[test]'
echo "setup.sh: ready (.venv/bin/weft)"
