# shellcheck shell=bash
# The guest's Nix store mode, decided at boot from the host's settings.json. Sourced by dvn-setup
# (./default.nix); tests/nix/run runs it against temporary files.
#
# dvn_store_setup SETTINGS RUNDIR STORE_URL NIXCONF DISK_BYTES
#   Host-store queries are on when SETTINGS has a valid "hostStorePort" (a vsock port, 1..4294967295) and
#   STORE_URL is not empty (empty: this guest's Nix has no local-overlay store, the host's offer is ignored):
#   - RUNDIR/nix-daemon.env: DVN_NIX_DAEMON_STORE=STORE_URL (the local-overlay store), else `auto`;
#   - RUNDIR/host-store.env: DVN_HOST_STORE_PORT=<port> (read by dvn-host-store@.service), removed when off;
#   - NIXCONF gets min-free/max-free (Nix's automatic GC) only when on: the local-overlay store deletes
#     from the upper layer alone, while a plain overlay's GC deletes lower (host) paths, i.e. writes
#     whiteouts that hide them from the guest.
#   The values only ever come from settings.json through this check, never into a unit file, so no `%`
#   of the store URL reaches systemd's specifier expansion.
dvn_store_setup() {
  local settings=$1 rundir=$2 url=$3 nixconf=$4 size=$5 port=""
  if [ -f "$settings" ]; then
    port=$(jq -r '.hostStorePort // empty' "$settings" 2>/dev/null) || port=""
  fi
  case $port in
    "") ;;
    *[!0-9]* | 0*) port=invalid ;;
    *) if [ "${#port}" -gt 10 ] || [ "$port" -gt 4294967295 ]; then port=invalid; fi ;;
  esac
  if [ "$port" = invalid ]; then
    echo "darwin-vz: invalid hostStorePort in settings.json: host-store queries off" >&2
    port=""
  fi

  if [ -n "$port" ] && [ -z "$url" ]; then
    echo "darwin-vz: the host offers host-store queries, but this guest does not use them (hostStoreQueries = false)" >&2
    port=""
  fi

  if [ -n "$port" ]; then
    printf 'DVN_HOST_STORE_PORT=%s\n' "$port" >"$rundir/host-store.env.new"
    mv "$rundir/host-store.env.new" "$rundir/host-store.env"
    printf 'DVN_NIX_DAEMON_STORE=%s\n' "$url" >"$rundir/nix-daemon.env.new"
    {
      echo "min-free = $((size / 10))"
      echo "max-free = $((size / 4))"
    } >>"$nixconf"
    echo "darwin-vz: host-store queries on (vsock port $port): nix-daemon uses the local-overlay store" >&2
  else
    rm -f "$rundir/host-store.env"
    printf 'DVN_NIX_DAEMON_STORE=auto\n' >"$rundir/nix-daemon.env.new"
  fi
  mv "$rundir/nix-daemon.env.new" "$rundir/nix-daemon.env"
}
