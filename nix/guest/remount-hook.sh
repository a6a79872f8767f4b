# shellcheck shell=bash
# Remount hook of the guest's local-overlay store (Nix's `remount-hook` store setting), and the boot-time
# repair dvn-setup runs. Rule: guest GC frees only the upper layer, it never hides a host path.
#
# Nix runs it with the store directory as $1 after its GC deleted a path that is also valid in the lower
# store straight from the upper layer (LocalOverlayStore::deleteStorePath, so no whiteout), which leaves the
# overlay's caches stale. Paths that are not valid in the lower store (the host's `.lock` files the guest
# copied up, a host path still being built) are deleted through the overlay, which writes a whiteout when
# the lower layer has the name: those whiteouts would hide host files from the guest.
# So: remove every whiteout (a character device 0/0) at the top of the upper layer whose name exists in the
# lower layer, then `mount -o remount STORE`. With --if-removed (boot), remount only if one was removed.
# Environment: DVN_UPPER (the overlay's upper dir), DVN_LOWER (its lower dir, the host store share).
set -u
if_removed=
if [ "${1:-}" = --if-removed ]; then
  if_removed=1
  shift
fi
store=${1:-/nix/store}

removed=0
while IFS= read -r -d '' entry; do
  [ "$(stat -c %t:%T -- "$entry")" = 0:0 ] || continue
  name=${entry##*/}
  if [ -e "$DVN_LOWER/$name" ] || [ -L "$DVN_LOWER/$name" ]; then
    rm -f -- "$entry" && removed=$((removed + 1))
  fi
done < <(find "$DVN_UPPER" -mindepth 1 -maxdepth 1 -type c -print0)

if [ "$removed" != 0 ]; then
  echo "darwin-vz: removed $removed whiteout(s) that hid host store paths from the guest" >&2
elif [ -n "$if_removed" ]; then
  exit 0
fi
exec mount -o remount "$store"
