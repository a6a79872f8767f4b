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
        # treats them as valid. Garbage collection by free space only then: otherwise it would delete the
        # (unregistered) lower store paths the guest itself runs from.
        if [ -f ${configDir}/nix-registration ] && nix-store --load-db < ${configDir}/nix-registration; then
          size=$(df --output=size -B1 / | tail -n 1)
          echo "min-free = $((size / 10))" >> /run/dvn/nix.conf.new
          echo "max-free = $((size / 4))" >> /run/dvn/nix.conf.new
        fi

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
      system-features = [ "nixos-test" "benchmark" "big-parallel" ];
      # Builds get what they need from the host (ssh-ng, builders-use-substitutes on the host side).
      auto-optimise-store = false;
    };
    # Written at boot by dvn-setup: max-jobs, cores, kvm, min-free/max-free, x86_64-linux.
    nix.extraOptions = ''
      !include /run/dvn/nix.conf
    '';
    systemd.services.nix-daemon = {
      after = [ "dvn-setup.service" ];
      wants = [ "dvn-setup.service" ];
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
