#!/usr/bin/env bash
# Installs the system services the tests start themselves: Mosquitto (MQTT broker), Chromium
# (headless browser for the dashboard test) and PostgreSQL (fleet storage test), and wrk for make bench. Debian/Ubuntu
# packages; needs root or sudo.
set -euo pipefail

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto mosquitto-clients)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || need+=(chromium)
# PostgreSQL server binaries (initdb, pg_ctl): the fleet storage test starts a throwaway cluster.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
# wrk: the HTTP load generator of benchmarks/bench_agent.py and bench_fleet_http.py (make bench).
command -v wrk >/dev/null 2>&1 || need+=(wrk)
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: please install ${need[*]} with your package manager" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-system-deps: installing ${need[*]}" >&2
$sudo apt-get update -q
# With recommends, as on a developer machine: Chromium renders the dashboard with its usual fonts.
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}"
