# Sourced by scripts/demo, scripts/test and scripts/bench: installs what darwin-vz-nix needs on a fresh
# Debian machine (as root), quickly when everything is already there.

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

export PATH="$HOME/.cargo/bin:$PATH"

apt_install() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]} (install them as root)"
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    }
}

# QEMU, passt (the guest's network), the Rust virtiofsd, vhost-device-vsock, OpenSSH's client: what the qemu
# engine runs; and e2fsck, with which the reliability tests check the guest's disk on the host.
ensure_vm_tools() {
    case "$(uname -m)" in
        x86_64) apt_install qemu-system-x86 qemu-system-common openssh-client passt e2fsprogs ;;
        aarch64) apt_install qemu-system-arm qemu-system-common openssh-client passt e2fsprogs ;;
        *) die "unsupported architecture $(uname -m)" ;;
    esac
    # The Rust virtiofsd: QEMU 7.2's C virtiofsd cannot make a share read-only, and the engine refuses to boot
    # read-only shares with it (guest root could remount them read-write and write to the host).
    if ! { command -v virtiofsd >/dev/null && virtiofsd --help 2>&1 | grep -q -- --readonly; }; then
        apt_install libcap-ng-dev libseccomp-dev pkg-config
        log "cargo install virtiofsd 1.14.0 (a few minutes)"
        cargo install --quiet --locked virtiofsd --version 1.14.0
    fi
    if ! command -v vhost-device-vsock >/dev/null; then
        log "cargo install vhost-device-vsock 0.3.0 (about 30 s)"
        cargo install --quiet --locked vhost-device-vsock --version 0.3.0
    fi
}

ensure_rust_target() {
    rustup target list --installed | grep -qx "$1" || { log "rustup target add $1"; rustup target add "$1" >/dev/null; }
}

# The host's Nix for real remote builds through the builder guest: Debian's nix-bin (2.8 on bookworm), used as
# root without a daemon. It talks ssh-ng to the guest's Nix 2.34. Installing it creates nothing under /nix yet:
# Nix makes /nix/store on first use.
ensure_host_nix() {
    apt_install nix-bin
}
