# NixOS guest of darwin-vz-nix (aarch64-linux), honouring the guest contract of ../../design.md:
# - virtio-fs `nix-store` (host store, read-only, optional), `dvn-config` (keys + settings.json, read-only),
#   `rosetta` (optional);
# - /dev/vda: ext4, formatted when blank (every boot when ephemeral), grown at boot;
# - /nix/store = overlay (lower: `nix-store` share, upper: disk, or tmpfs when ephemeral);
# - sshd on vsock port 22 (socket activation), the guest agent on vsock port 1025.
{ config, lib, pkgs, modulesPath, ... }:

let
  cfg = config.services.darwin-vz-guest;
  configDir = "/run/dvn-config";
  rosettaDir = "/run/rosetta";
  settings = "${configDir}/settings.json";

  # Initrd (busybox) check of settings.json, mounted by the initrd at /dvn-config.
  initrdEphemeral = ''
    dvn_ephemeral=
    mkdir -p /dvn-config
    if mount -t virtiofs -o ro dvn-config /dvn-config 2>/dev/null; then
      if grep -Eq '"ephemeral"[[:space:]]*:[[:space:]]*true' /dvn-config/settings.json 2>/dev/null; then
        dvn_ephemeral=1
      fi
      umount /dvn-config
    fi
  '';

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
      default = 1025;
      description = "vsock port of the guest agent (guest contract).";
    };
  };

  config = {
    system.stateVersion = lib.mkDefault "25.05";
    networking.hostName = lib.mkDefault "darwin-vz-guest";
    nixpkgs.hostPlatform = lib.mkDefault "aarch64-linux";
    documentation.enable = false;

    # --- boot: direct kernel boot by the host; no boot loader ---
    boot.loader.grub.enable = false;
    boot.initrd.systemd.enable = false; # the scripted initrd runs the hooks below
    boot.initrd.availableKernelModules = [ "virtio_pci" "virtio_blk" "virtio_net" "virtio_console" "virtio_rng" "virtio_balloon" ];
    boot.initrd.kernelModules = [ "virtiofs" "overlay" "ext4" ];
    boot.kernelModules = [ "vsock" "vmw_vsock_virtio_transport" ];
    # The host reads the toplevel's kernel-params and adds init=.
    boot.kernelParams = [ "console=hvc0" ];

    # --- disk: formatted when blank (every boot when ephemeral), grown to the device at boot ---
    fileSystems."/" = {
      device = "/dev/vda";
      fsType = "ext4";
      autoResize = true;
      options = [ "noatime" ];
    };
    # The scripted initrd does not honour autoFormat: format here, before the root is mounted.
    boot.initrd.extraUtilsCommands = ''
      copy_bin_and_libs ${pkgs.e2fsprogs}/bin/mke2fs
    '';
    boot.initrd.postDeviceCommands = ''
      ${initrdEphemeral}
      fstype=$(blkid -o value -s TYPE /dev/vda || true)
      if [ -n "$dvn_ephemeral" ] || [ -z "$fstype" ]; then
        echo "darwin-vz: formatting /dev/vda (''${dvn_ephemeral:+ephemeral}''${fstype:-blank})"
        mke2fs -q -F -t ext4 -L dvn-root /dev/vda
      fi
    '';

    # --- /nix/store: overlay over the host store; the disk's store alone when the share is absent ---
    boot.initrd.postMountCommands = ''
      ${initrdEphemeral}
      r=$targetRoot/nix
      mkdir -p $r/.ro-store $r/.rw-store $r/store
      if [ -n "$dvn_ephemeral" ]; then
        mount -t tmpfs -o mode=0755 tmpfs $r/.rw-store
      fi
      mkdir -p $r/.rw-store/store $r/.rw-store/work
      chown 0:30000 $r/.rw-store/store  # root:nixbld, as NixOS keeps /nix/store
      chmod 1775 $r/.rw-store/store
      if mount -t virtiofs -o ro nix-store $r/.ro-store; then
        mount -t overlay overlay \
          -o lowerdir=$r/.ro-store,upperdir=$r/.rw-store/store,workdir=$r/.rw-store/work $r/store
      else
        echo "darwin-vz: no nix-store share, using the disk's store only"
        mount -o bind $r/.rw-store/store $r/store
      fi
    '';

    # --- the host's config share: keys and settings ---
    fileSystems.${configDir} = {
      device = "dvn-config";
      fsType = "virtiofs";
      options = [ "ro" "nofail" ];
    };

    # --- Rosetta: mounted when shared; binfmt and x86_64-linux only when it is there ---
    fileSystems.${rosettaDir} = {
      device = "rosetta";
      fsType = "virtiofs";
      options = [ "ro" "nofail" "x-systemd.device-timeout=2s" ];
    };

    systemd.services.dvn-setup = {
      description = "darwin-vz-nix guest setup (keys, nix settings, Rosetta)";
      wantedBy = [ "multi-user.target" "sshd.socket" ];
      before = [ "sshd.socket" "sshd-keygen.service" "nix-daemon.service" "nix-daemon.socket" ];
      # The shares are `nofail` mounts: still ordered before local-fs.target, never required.
      after = [ "local-fs.target" ];
      path = [ pkgs.coreutils pkgs.jq pkgs.util-linux config.nix.package ];
      serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
      script = ''
        set -eu
        install -d -m 0755 /run/dvn /etc/ssh

        # ssh: host key generated and pinned by the host; client key authorized for `builder`.
        if [ -f ${configDir}/ssh_host_ed25519_key ]; then
          install -m 0600 ${configDir}/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key
          install -m 0644 ${configDir}/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ed25519_key.pub
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
        umount ${configDir} || true
      '';
    };

    # --- sshd on vsock port 22, one instance per connection (socket activation) ---
    services.openssh = {
      enable = true;
      startWhenNeeded = true;
      openFirewall = false;
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
    users.users.root.hashedPassword = "!";
    users.users.builder = {
      isNormalUser = true;
      description = "Nix remote builder";
      hashedPassword = "!";
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

    # --- network: DHCP from the host's NAT; DNS from DHCP, never hard-coded ---
    networking.useNetworkd = true;
    networking.useDHCP = false;
    networking.firewall.enable = false; # nothing listens on the network: sshd is on vsock
    systemd.network.networks."10-uplink" = {
      matchConfig.Type = "ether";
      networkConfig.DHCP = "yes";
      linkConfig.RequiredForOnline = "routable";
    };
    services.resolved.enable = true;
  };
}
