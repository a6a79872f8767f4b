# NixOS guest of darwin-vz-nix (aarch64-linux), honouring the guest contract of ../../design.md:
# - virtio-fs `nix-store` (host store, read-only; the guest's own system lives there, so it is required),
#   `dvn-config` (keys + settings.json, read-only), `rosetta` (optional);
# - /dev/vda: ext4, formatted when blank (wiped first when ephemeral), grown at boot;
# - /nix/store = overlay (lower: `nix-store` share, upper: disk);
# - sshd on vsock port 22 (socket activation), the guest agent on vsock port 1023 (privileged: only root binds it).
# The boot path and the reasons for each unit are in ./README.md.
{ config, lib, pkgs, modulesPath, ... }:

let
  cfg = config.services.darwin-vz-guest;
  configDir = "/run/dvn-config";
  rosettaDir = "/run/rosetta";
  settings = "${configDir}/settings.json";
  # systemd unit names of the two share mounts (`systemd-escape -p --suffix=mount`; tests/nix checks them).
  configMount = "run-dvn\\x2dconfig.mount";
  rosettaMount = "run-rosetta.mount";

  # --- host-store queries (issue 11; the contract is in ./README.md "Host-store queries") ---
  # The guest's nix-daemon runs Nix's local-overlay store when the host offers its Nix daemon (settings.json
  # `hostStorePort`): the lower store is the host daemon, behind the host's read-only filter, reached through
  # this socket and a vsock bridge; the overlay of `fileSystems."/nix/store"` holds the files.
  hostStoreSocket = "/run/dvn/host-store.sock";
  storeOverlay = config.fileSystems."/nix/store".overlay;
  remountHook = pkgs.writeShellScript "dvn-remount-hook" (''
    PATH=${lib.makeBinPath [ pkgs.coreutils pkgs.findutils pkgs.util-linux ]}
    DVN_UPPER=${storeOverlay.upperdir}
    DVN_LOWER=${lib.head storeOverlay.lowerdir}
    export PATH DVN_UPPER DVN_LOWER
  '' + builtins.readFile ./remount-hook.sh);
  # check-mount=false: Nix would compare the overlay's lowerdir (/nix/.ro-store) with the lower store's
  # store dir (/nix/store, the host's), which differ by design. Every `%` here reaches nix-daemon through
  # /run/dvn/nix-daemon.env, never through a unit file (where systemd would expand it as a specifier).
  localOverlayStore = "local-overlay://?lower-store=${lib.escapeURL "unix://${hostStoreSocket}"}"
    + "&upper-layer=${storeOverlay.upperdir}&check-mount=false&remount-hook=${remountHook}";

  rosettaBinfmt = '':rosetta:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00:\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:${rosettaDir}/rosetta:CF'';
in
{
  imports = [ (modulesPath + "/profiles/minimal.nix") ];

  options.services.darwin-vz-guest = {
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ../package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./nix/package.nix { }";
      description = "The darwin-vz-nix package whose `dvn-agent` runs in the guest.";
    };
    hostStoreQueries = lib.mkOption {
      type = lib.types.bool;
      # Nix's local-overlay store came with Nix 2.19 (experimental feature `local-overlay-store`); Lix and
      # older Nix lack it, and a daemon that cannot open its store fails every build.
      default = lib.getName config.nix.package == "nix" && lib.versionAtLeast (lib.getVersion config.nix.package) "2.19";
      defaultText = lib.literalExpression ''lib.getName config.nix.package == "nix" && lib.versionAtLeast (lib.getVersion config.nix.package) "2.19"'';
      description = ''
        Use the host's store through Nix's local-overlay store when the host offers its Nix daemon
        (settings.json `hostStorePort`), so that build inputs already in the host store are not uploaded.
        Needs a Nix with the local-overlay store (Nix >= 2.19, not Lix): on by default only for such a
        `nix.package`. When false the guest ignores the host's offer: its nix-daemon keeps the plain store,
        inputs come over ssh, and no automatic garbage collection runs.
      '';
    };
    agentPort = lib.mkOption {
      type = lib.types.port;
      default = 1023;
      description = "vsock port of the guest agent (guest contract: privileged, so only guest root can bind it).";
    };
  };

  config = {
    system.stateVersion = lib.mkDefault "25.05";
    networking.hostName = lib.mkDefault "darwin-vz-guest";
    nixpkgs.hostPlatform = lib.mkDefault "aarch64-linux";
    documentation.enable = false;

    # --- boot: direct kernel boot by the host; no boot loader; systemd in the initrd ---
    boot.loader.grub.enable = false;
    # The scripted initrd is deprecated (removal planned for 26.11) and systemd's is the default: say so,
    # so that a downgrade of the default cannot bring the old hooks back (system/boot/systemd/initrd.nix).
    boot.initrd.systemd.enable = true;
    # Only what the devices need (README.md "initrd"): the disk, the shares, the console. NixOS' default list
    # (SATA, USB, NVMe, ...) only makes the initrd bigger and slower to unpack.
    boot.initrd.includeDefaultModules = false;
    boot.initrd.availableKernelModules = [ "virtio_pci" "virtio_blk" "virtio_console" ];
    # virtio-fs mounts name a tag, not a device: no udev event loads the module, so load it explicitly.
    boot.initrd.kernelModules = [ "virtiofs" "overlay" ];
    boot.kernelModules = [ "vmw_vsock_virtio_transport" ];
    # The host reads the toplevel's kernel-params and adds init=.
    # systemd.ssh_auto=no: systemd-ssh-generator would otherwise add its own sshd-vsock.socket on vsock port 22
    # (and an AF_UNIX one) in any VM; ours is the only one (README.md "sshd").
    boot.kernelParams = [ "console=hvc0" "systemd.ssh_auto=no" ];

    # --- disk: formatted when blank, grown to the device at boot (systemd-makefs / systemd-growfs) ---
    fileSystems."/" = {
      device = "/dev/vda";
      fsType = "ext4";
      autoFormat = true;
      autoResize = true;
      options = [ "noatime" ];
    };

    # Ephemeral: wipe the disk's signature before systemd-makefs looks at it, so that every boot starts empty.
    boot.initrd.systemd.services.dvn-ephemeral = {
      description = "darwin-vz-nix: wipe /dev/vda when the host asks for an ephemeral guest";
      requires = [ "dev-vda.device" ];
      after = [ "dev-vda.device" "systemd-modules-load.service" ];
      before = [ "systemd-makefs@dev-vda.service" "sysroot.mount" ];
      wantedBy = [ "initrd-root-device.target" ];
      unitConfig.DefaultDependencies = false;
      serviceConfig.Type = "oneshot";
      path = [ pkgs.util-linux pkgs.gnugrep ];
      script = ''
        mkdir -p /run/dvn-initrd-config
        if mount -t virtiofs -o ro dvn-config /run/dvn-initrd-config; then
          if grep -Eq '"ephemeral"[[:space:]]*:[[:space:]]*true' /run/dvn-initrd-config/settings.json; then
            echo "darwin-vz: ephemeral guest, wiping /dev/vda"
            wipefs -a /dev/vda
          fi
          umount /run/dvn-initrd-config
        fi
      '';
    };

    # --- /nix/store: overlay over the host store, upper layer on the disk ---
    # Nix's lock files: the guest's nix-daemon opens `<path>.lock` read-write, which makes overlayfs copy a lock
    # file of the host (lower layer) up to the disk first; the guest's flock() then locks that copy, in the guest
    # kernel, so a lock the host holds never blocks a guest build (README.md "Host lock files").
    fileSystems."/nix/.ro-store" = {
      device = "nix-store";
      fsType = "virtiofs";
      options = [ "ro" ];
      neededForBoot = true;
    };
    fileSystems."/nix/store" = {
      overlay = {
        lowerdir = [ "/nix/.ro-store" ];
        upperdir = "/nix/.rw-store/store";
        workdir = "/nix/.rw-store/work";
      };
      neededForBoot = true;
    };

    # --- the host's config share (keys, settings) and Rosetta: optional, so `nofail` ---
    # systemd.mount(5): a `nofail` mount is not ordered before local-fs.target; dvn-setup orders itself after
    # both mount units instead (Wants + After: a missing share is skipped, never waited for).
    fileSystems.${configDir} = {
      device = "dvn-config";
      fsType = "virtiofs";
      options = [ "ro" "nofail" ];
    };
    fileSystems.${rosettaDir} = {
      device = "rosetta";
      fsType = "virtiofs";
      options = [ "ro" "nofail" ];
    };

    systemd.services.dvn-setup = {
      description = "darwin-vz-nix guest setup (keys, nix settings, Rosetta)";
      wantedBy = [ "multi-user.target" ];
      wants = [ configMount rosettaMount ];
      after = [ configMount rosettaMount ];
      # Not Before= any socket: sockets come before basic.target, which this unit (default dependencies)
      # follows. sshd@.service and nix-daemon.service wait for it instead (below).
      path = [ pkgs.coreutils pkgs.jq pkgs.util-linux config.nix.package ];
      serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
      script = ''
        set -eu
        install -d -m 0755 /run/dvn /etc/ssh

        # ssh: host key generated and pinned by the host; client key authorized for `builder`.
        if [ -f ${configDir}/ssh_host_ed25519_key ]; then
          install -m 0600 ${configDir}/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key
          install -m 0644 ${configDir}/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ed25519_key.pub
        else
          echo "darwin-vz: no host key in ${configDir}: sshd cannot start" >&2
        fi
        if [ -f ${configDir}/authorized_keys ]; then
          install -m 0644 ${configDir}/authorized_keys /run/dvn/authorized_keys
        fi

        # nix-daemon settings from the VM's size (settings.json), included by /etc/nix/nix.conf.
        cores=$(nproc); max_jobs=$cores
        if [ -f ${settings} ]; then
          cores=$(jq -r '.cores // empty' ${settings} || echo "$cores")
          max_jobs=$(jq -r '.maxJobs // empty' ${settings} || echo "$max_jobs")
        fi
        {
          echo "max-jobs = ''${max_jobs:-1}"
          echo "cores = ''${cores:-0}"
          if [ -e /dev/kvm ]; then echo "extra-system-features = kvm"; fi
        } > /run/dvn/nix.conf.new

        # Guest store paths known to the host (at least the guest system closure), so that nix-daemon
        # treats them as valid even without host-store queries.
        if [ -f ${configDir}/nix-registration ]; then
          nix-store --load-db < ${configDir}/nix-registration || echo "darwin-vz: loading the host's registration failed" >&2
        fi
        # The store nix-daemon runs (/run/dvn/nix-daemon.env), the vsock port of the host's Nix daemon
        # (/run/dvn/host-store.env), and Nix's automatic GC by free space: only with the local-overlay
        # store, which frees the upper layer alone (./store-setup.sh).
        . ${./store-setup.sh}
        dvn_store_setup ${settings} /run/dvn ${lib.escapeShellArg (lib.optionalString cfg.hostStoreQueries localOverlayStore)} /run/dvn/nix.conf.new \
          "$(df --output=size -B1 / | tail -n 1)"
        # Whiteouts that hide host paths (a GC through a plain overlay, or one of an older guest): removed
        # before nix-daemon starts, whatever the mode (./remount-hook.sh).
        ${remountHook} --if-removed /nix/store || echo "darwin-vz: the store repair failed" >&2

        # Rosetta: register binfmt only when the share is really there.
        if [ -x ${rosettaDir}/rosetta ]; then
          if [ ! -e /proc/sys/fs/binfmt_misc/rosetta ]; then
            mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
            printf '%s' ${lib.escapeShellArg rosettaBinfmt} > /proc/sys/fs/binfmt_misc/register
          fi
          echo "extra-platforms = x86_64-linux" >> /run/dvn/nix.conf.new
          echo "extra-sandbox-paths = ${rosettaDir}" >> /run/dvn/nix.conf.new
          # Nix's seccomp filter breaks x86_64 binaries run through Rosetta.
          echo "filter-syscalls = false" >> /run/dvn/nix.conf.new
        fi
        mv /run/dvn/nix.conf.new /run/dvn/nix.conf

        # The share shows files with the host's uid, which may be builder's: once copied, unmount it so
        # nothing in the guest can read the host key through it.
        if mountpoint -q ${configDir}; then umount ${configDir}; fi
      '';
    };

    # --- sshd on vsock port 22, one instance per connection (socket activation) ---
    services.openssh = {
      enable = true;
      startWhenNeeded = true;
      openFirewall = false;
      # The host generates the guest's host key and pins it (dvn-setup installs it): a key made in the guest
      # could never match the pin, so no sshd-keygen.service.
      generateHostKeys = false;
      hostKeys = [{ path = "/etc/ssh/ssh_host_ed25519_key"; type = "ed25519"; }];
      authorizedKeysFiles = [ "/run/dvn/authorized_keys" ];
      settings = {
        PasswordAuthentication = false;
        KbdInteractiveAuthentication = false;
        PermitRootLogin = "no";
        AllowUsers = [ "builder" ];
      };
    };
    systemd.sockets.sshd.socketConfig.ListenStream = lib.mkForce [ "vsock::22" ];
    # A connection that arrives while dvn-setup runs is held until the host key is in place.
    systemd.services."sshd@" = {
      wants = [ "dvn-setup.service" ];
      after = [ "dvn-setup.service" ];
    };

    # --- guest agent on its vsock port ---
    systemd.services.dvn-agent = {
      description = "darwin-vz-nix guest agent";
      wantedBy = [ "multi-user.target" ];
      after = [ "local-fs.target" ];
      serviceConfig = {
        ExecStart = lib.escapeShellArgs [
          "${cfg.package}/bin/dvn-agent"
          "--port"
          (toString cfg.agentPort)
          "--disk-path"
          "/"
          "--poweroff-command"
          "systemctl poweroff"
        ];
        Restart = "always";
        RestartSec = 1;
      };
    };
    # The host agent client sets the clock (also after the Mac slept).
    services.timesyncd.enable = false;
    # Give freed blocks back to the host's sparse disk image (the store only grows otherwise).
    services.fstrim.enable = true;

    # --- builder user: no password, no sudo ---
    users.mutableUsers = false;
    # users-groups.nix asserts that root or a wheel user can log in. Here nobody logs in but `builder`, with
    # the key the host puts in the config share at boot (nothing declared at build time), and the host
    # reaches a broken guest through the agent and the console log, not through a root login.
    users.allowNoPasswordLogin = true;
    users.users.builder = {
      isNormalUser = true;
      description = "Nix remote builder";
    };
    security.sudo.enable = false;

    # --- nix-daemon ---
    nix.settings = {
      trusted-users = [ "root" "builder" ];
      experimental-features = [ "nix-command" "flakes" ];
      # For the local-overlay store of host-store queries (read by every Nix in the guest; harmless when off).
      extra-experimental-features = [ "local-overlay-store" ];
      system-features = [ "nixos-test" "benchmark" "big-parallel" ];
      # Builds get what they need from the host (ssh-ng, builders-use-substitutes on the host side).
      auto-optimise-store = false;
    };
    # Written at boot by dvn-setup: max-jobs, cores, kvm, min-free/max-free, x86_64-linux.
    nix.extraOptions = ''
      !include /run/dvn/nix.conf
    '';
    # services/system/nix-daemon.nix takes nix-daemon.service from the Nix package (systemd.packages), so
    # this is a drop-in: ExecStart is reset ("") before ours. Only the root daemon gets --store: a `store =`
    # line in nix.conf would also reach builder's `nix-daemon --stdio` (ssh-ng), which cannot open a local
    # store as non-root and must forward to this daemon. `auto` until dvn-setup wrote the file (and when
    # host-store queries are off); an EnvironmentFile overrides Environment= (systemd.exec(5)).
    systemd.services.nix-daemon = {
      after = [ "dvn-setup.service" ];
      wants = [ "dvn-setup.service" ];
      environment.DVN_NIX_DAEMON_STORE = "auto";
      serviceConfig = {
        EnvironmentFile = "-/run/dvn/nix-daemon.env";
        # ${VAR} (not $VAR): one argument, whatever the URL holds.
        ExecStart = [ "" "${config.nix.package.out}/bin/nix-daemon --daemon --store \${DVN_NIX_DAEMON_STORE}" ];
      };
    };

    # The lower store of the local-overlay store: root's nix-daemon connects here; each connection is
    # bridged by the agent to the host (vsock CID 2, port from settings.json), where darwin-vz-nix passes
    # read-only Nix worker operations to the host's daemon. 0600: only root in the guest. Not a security
    # boundary: any guest process can reach that vsock port; the host's filter is the boundary.
    systemd.sockets.dvn-host-store = {
      description = "darwin-vz-nix: the host's Nix store (read-only), lower store of the guest's nix-daemon";
      wantedBy = [ "sockets.target" ];
      socketConfig = {
        ListenStream = hostStoreSocket;
        SocketMode = "0600";
        Accept = true;
      };
    };
    systemd.services."dvn-host-store@" = {
      description = "darwin-vz-nix: bridge to the host's Nix store";
      # The port is in /run/dvn/host-store.env, written by dvn-setup only when queries are on; without it
      # the connection is closed and nix-daemon reports the lower store as unreachable.
      wants = [ "dvn-setup.service" ];
      after = [ "dvn-setup.service" ];
      unitConfig.ConditionPathExists = "/run/dvn/host-store.env";
      serviceConfig = {
        EnvironmentFile = "/run/dvn/host-store.env";
        ExecStart = "${cfg.package}/bin/dvn-agent host-bridge --port \${DVN_HOST_STORE_PORT}";
        StandardInput = "socket";
        StandardOutput = "socket";
        StandardError = "journal";
      };
    };

    # --- network: DHCP from the host's NAT (for fixed-output builds); nothing waits for it ---
    networking.useNetworkd = true;
    networking.useDHCP = false;
    networking.dhcpcd.enable = false;
    networking.firewall.enable = false; # nothing listens on the network: sshd and the agent are on vsock
    systemd.network.wait-online.enable = false;
    systemd.network.networks."10-uplink" = {
      matchConfig.Type = "ether";
      networkConfig.DHCP = "yes";
      linkConfig.RequiredForOnline = "no";
    };
    services.resolved.enable = true;
  };
}
