# nix-darwin module `services.darwin-vz`: a NixOS Linux builder VM run by darwin-vz-nix.
#
# A plain module in one file. The flake's `darwinModules.default` imports it and sets the defaults of
# `package` (this flake's darwin-vz-nix) and `guestConfiguration` (this flake's NixOS guest).
{ config, lib, pkgs, options, ... }:

let
  inherit (lib)
    mkIf mkMerge mkOption mkEnableOption mkDefault types literalExpression
    optional escapeShellArg;

  cfg = config.services.darwin-vz;
  opts = options.services.darwin-vz;
  wd = cfg.workingDirectory;

  hostAlias = "darwin-vz-nix";
  sshConfigFile = "ssh/ssh_config.d/0-darwin-vz-nix.conf";
  logFile = "${wd}/daemon.log";
  # What launchd itself captures: only what is printed before logging starts (and --verbose's console copy).
  launchdLog = "${wd}/launchd.log";

  # The guest is built from `guestConfiguration` with `extraNixOSConfig` on top.
  guest =
    if cfg.guestConfiguration == null then null
    else cfg.guestConfiguration.extendModules { modules = [ cfg.extraNixOSConfig ]; };
  guestToplevel = guest.config.system.build.toplevel;

  extraNixOSConfigSet = opts.extraNixOSConfig.highestPrio < (lib.mkOptionDefault { }).priority;
  pathsSetByUser = builtins.any (o: o.highestPrio < (mkDefault "").priority)
    [ opts.kernelPath opts.initrdPath opts.systemPath ];

  # nix-darwin's own nix-daemon listens here (modules/services/nix-daemon.nix: the launchd socket, or the
  # daemon's default path without it).
  defaultDaemonSocket = "/nix/var/nix/daemon-socket/socket";

  # Same syntax as the CLI: bytes, or a number with K/M/G/T or KiB/MiB/GiB/TiB (powers of 1024), not zero.
  diskSizeValid = builtins.match "0*[1-9][0-9]*([KkMmGgTt]([Ii][Bb])?|[Bb])?" cfg.diskSize != null;

  startArgs = [
    "--state-dir"
    wd
    "start"
    "--cores"
    (toString cfg.cores)
    "--memory"
    (toString cfg.memory)
    "--disk-size"
    cfg.diskSize
    "--kernel"
    cfg.kernelPath
    "--initrd"
    cfg.initrdPath
    "--system"
    cfg.systemPath
    # The guest's own system lives in the host store: a missing share is an error, not a silent default.
    "--share-nix-store"
    "--host-nix-daemon"
    (if cfg.hostStoreQueries.enable then cfg.hostStoreQueries.daemonSocket else "none")
    "--idle-timeout"
    (toString cfg.idleTimeout)
    (if cfg.rosetta then "--rosetta" else "--no-rosetta")
    "--port"
    (toString cfg.port)
    "--max-jobs"
    (toString cfg.maxJobs)
    "--log-file"
    logFile
  ]
  ++ optional cfg.onDemand "--on-demand"
  ++ optional cfg.ephemeral "--ephemeral"
  ++ optional cfg.verbose "--verbose";
in
{
  options.services.darwin-vz = {
    enable = mkEnableOption "the darwin-vz-nix Linux builder VM (Virtualization.framework)";

    package = mkOption {
      type = types.package;
      defaultText = literalExpression "inputs.darwin-vz-nix.packages.\${system}.darwin-vz-nix";
      description = "The darwin-vz-nix package to use (set by the flake's `darwinModules.default`).";
    };

    cores = mkOption {
      type = types.ints.positive;
      default = 4;
      description = "Number of virtual CPUs of the VM.";
    };

    memory = mkOption {
      type = types.ints.positive;
      default = 8192;
      description = "Memory of the VM in MiB.";
    };

    diskSize = mkOption {
      type = types.str;
      default = "100G";
      example = "50G";
      description = ''
        Size of the sparse disk image: bytes, or a number with a K, M, G or T suffix (powers of 1024).
        The disk is grown to this size at the next start; the guest grows its file system at boot.
      '';
    };

    rosetta = mkOption {
      type = types.bool;
      default = true;
      description = "Share Rosetta 2 with the guest so that it also builds for x86_64-linux.";
    };

    idleTimeout = mkOption {
      type = types.ints.unsigned;
      default = 180;
      description = ''
        Minutes without an ssh connection or a running build after which the VM is shut down (0 = never).
        With `onDemand` the next connection boots it again; without it the daemon exits and stays stopped
        until the next boot or `launchctl kickstart system/org.nixos.darwin-vz-nix`.
      '';
    };

    kernelPath = mkOption {
      type = types.str;
      description = ''
        Path to the guest kernel image. Defaults to `<guest toplevel>/kernel` when `guestConfiguration` is set
        (the flake's module sets it); required otherwise.
      '';
    };

    initrdPath = mkOption {
      type = types.str;
      description = ''
        Path to the guest initrd. Defaults to `<guest toplevel>/initrd` when `guestConfiguration` is set.
      '';
    };

    systemPath = mkOption {
      type = types.str;
      description = ''
        Path to the guest NixOS system toplevel (its `init` and `kernel-params` are used).
        Defaults to the toplevel of `guestConfiguration` + `extraNixOSConfig`.
      '';
    };

    guestConfiguration = mkOption {
      type = types.nullOr types.raw;
      default = null;
      defaultText = literalExpression "inputs.darwin-vz-nix.nixosConfigurations.darwin-vz-guest";
      description = ''
        An aarch64-linux NixOS configuration (the result of `nixpkgs.lib.nixosSystem`) from which
        `kernelPath`, `initrdPath` and `systemPath` default. `extraNixOSConfig` is applied on top of it with
        `extendModules`.
      '';
    };

    extraNixOSConfig = mkOption {
      type = types.deferredModule;
      default = { };
      example = literalExpression "{ environment.systemPackages = [ pkgs.git ]; }";
      description = ''
        A NixOS module added to the guest (through `guestConfiguration.extendModules`). The guest is then
        your own aarch64-linux system: building it needs an existing Linux builder (for example
        `nix.linux-builder` for one switch, before enabling this module) or a binary cache that has it.
        Ignored, with a warning, when `kernelPath`, `initrdPath` or `systemPath` are set explicitly.
      '';
    };

    ephemeral = mkOption {
      type = types.bool;
      default = false;
      description = "Start every boot from an empty disk (the guest store and Nix database are wiped).";
    };

    workingDirectory = mkOption {
      type = types.str;
      default = "/var/lib/darwin-vz-nix";
      description = "State directory of the VM (disk, keys, logs).";
    };

    maxJobs = mkOption {
      type = types.ints.positive;
      default = cfg.cores;
      defaultText = literalExpression "config.services.darwin-vz.cores";
      description = "Concurrent build jobs (the guest's nix-daemon `max-jobs` and the build machine's `maxJobs`).";
    };

    speedFactor = mkOption {
      type = types.ints.positive;
      default = 1;
      description = "`speedFactor` of the build machine.";
    };

    protocol = mkOption {
      type = types.str;
      default = "ssh-ng";
      description = "Protocol Nix uses to reach the builder (`ssh-ng` or `ssh`).";
    };

    supportedFeatures = mkOption {
      type = types.listOf types.str;
      default = [ "benchmark" "big-parallel" ];
      description = ''
        Features of the build machine. No `kvm`: Virtualization.framework offers no nested virtualization.
      '';
    };

    mandatoryFeatures = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "`mandatoryFeatures` of the build machine.";
    };

    onDemand = mkOption {
      type = types.bool;
      default = true;
      description = ''
        launchd owns the loopback port and starts darwin-vz-nix at the first connection, which boots the VM.
        When false the VM is started at boot (RunAtLoad) and restarted only after a crash.
      '';
    };

    port = mkOption {
      type = types.port;
      default = 31122;
      description = "Loopback TCP port (127.0.0.1) at which the guest's sshd is reached.";
    };

    hostStoreQueries = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Let the guest ask the host's Nix daemon which store paths are valid, so that a build input already
          in the host's /nix/store is never uploaded over ssh (the guest reads its files through the read-only
          store share). darwin-vz-nix connects to `daemonSocket` itself and passes only read-only Nix worker
          operations from the guest (a live view: paths added after boot are seen); the guest's nix-daemon
          runs Nix's experimental local-overlay store with that as its lower store.
          When false, `--host-nix-daemon none`: the guest knows only its own system's paths and inputs are
          copied over ssh.
        '';
      };
      daemonSocket = mkOption {
        type = types.str;
        default = defaultDaemonSocket;
        description = ''
          The host Nix daemon's socket, passed as `darwin-vz-nix start --host-nix-daemon`. The default is where
          nix-darwin's nix-daemon listens. darwin-vz-nix refuses to start (exit 2) when an explicitly given
          socket is missing or not a socket, so the service fails visibly rather than uploading everything;
          launchd starts it again (at the next connection, or after 10 s without `onDemand`), which also
          covers a boot where darwin-vz-nix starts before nix-daemon has created its socket.
          (With Determinate Nix, `nix.enable = false`, this whole module is refused: it needs nix-darwin to
          manage `nix.buildMachines`.)
        '';
      };
    };

    verbose = mkOption {
      type = types.bool;
      default = false;
      description = "Also copy the VM console (always in console.log) to launchd.log in the working directory.";
    };
  };

  config = mkIf cfg.enable (mkMerge [
    (mkIf (guest != null) {
      services.darwin-vz = {
        kernelPath = mkDefault "${guestToplevel}/kernel";
        initrdPath = mkDefault "${guestToplevel}/initrd";
        systemPath = mkDefault "${guestToplevel}";
      };
    })
    {
      assertions = [
        {
          assertion = !config.nix.linux-builder.enable;
          message = "services.darwin-vz and nix.linux-builder cannot both be enabled: both register a Linux builder VM.";
        }
        {
          assertion = pkgs.stdenv.hostPlatform.isDarwin && pkgs.stdenv.hostPlatform.isAarch64;
          message = "services.darwin-vz needs an Apple Silicon Mac (aarch64-darwin): the guest is aarch64-linux.";
        }
        {
          assertion = config.nix.enable;
          message = "services.darwin-vz requires nix.enable (it configures nix.buildMachines).";
        }
        {
          assertion = diskSizeValid;
          message = "services.darwin-vz.diskSize must be a positive number of bytes with an optional K/M/G/T suffix (e.g. \"100G\"), not \"${cfg.diskSize}\".";
        }
        {
          assertion = cfg.port != 0;
          message = "services.darwin-vz.port must not be 0: ssh_config and launchd need a fixed port.";
        }
        {
          assertion = lib.hasPrefix "/" wd && builtins.match ".*[[:space:]\"'].*" wd == null;
          message = "services.darwin-vz.workingDirectory must be an absolute path without spaces or quotes.";
        }
        {
          assertion = !cfg.hostStoreQueries.enable
            || (lib.hasPrefix "/" cfg.hostStoreQueries.daemonSocket && builtins.match ".*[\n\r].*" cfg.hostStoreQueries.daemonSocket == null);
          message = "services.darwin-vz.hostStoreQueries.daemonSocket must be an absolute path (to turn the queries off, set hostStoreQueries.enable = false).";
        }
        {
          assertion = builtins.elem cfg.protocol [ "ssh" "ssh-ng" ];
          message = "services.darwin-vz.protocol must be \"ssh\" or \"ssh-ng\".";
        }
        {
          assertion = !extraNixOSConfigSet || cfg.guestConfiguration != null;
          message = "services.darwin-vz.extraNixOSConfig needs services.darwin-vz.guestConfiguration (set by the flake's darwinModules.default).";
        }
      ];

      warnings =
        optional (extraNixOSConfigSet && pathsSetByUser)
          "services.darwin-vz.extraNixOSConfig has no effect: kernelPath/initrdPath/systemPath are set explicitly."
        ++ optional (builtins.elem "kvm" cfg.supportedFeatures)
          "services.darwin-vz.supportedFeatures contains \"kvm\", but the guest has no nested virtualization.";

      nix.distributedBuilds = true;
      nix.settings.builders-use-substitutes = true;
      nix.buildMachines = [{
        hostName = hostAlias;
        sshUser = "builder";
        sshKey = "${wd}/ssh/id_ed25519";
        systems = [ "aarch64-linux" ] ++ optional cfg.rosetta "x86_64-linux";
        inherit (cfg) maxJobs speedFactor supportedFeatures mandatoryFeatures protocol;
        # No publicHostKey: the key is created at activation; ssh_config pins it through known_hosts.
      }];

      # Read by root's nix-daemon and by users' ssh: the guest's host key, generated on the host by
      # `darwin-vz-nix init`, is pinned; nothing is trusted on first use.
      # ssh takes the first value it reads for each option, and reads /etc/ssh/ssh_config.d/* in lexical order
      # (macOS' /etc/ssh/ssh_config includes them at its top). nix-darwin's programs.ssh.extraConfig is
      # 100-nix-darwin.conf (modules/programs/ssh.nix), where a `Host *` block would otherwise win over a
      # 200- file: this file sorts before any name that starts with a digit, so the pin holds whatever
      # `Host *` settings follow. ProxyCommand/ProxyJump none: a global jump host must not carry the loopback
      # connection elsewhere. GlobalKnownHostsFile /dev/null: only the pinned key is accepted.
      environment.etc.${sshConfigFile}.text = ''
        Host ${hostAlias}
          HostName 127.0.0.1
          Port ${toString cfg.port}
          User builder
          IdentityFile ${wd}/ssh/id_ed25519
          IdentitiesOnly yes
          HostKeyAlias ${hostAlias}
          UserKnownHostsFile ${wd}/ssh/known_hosts
          GlobalKnownHostsFile /dev/null
          StrictHostKeyChecking yes
          UpdateHostKeys no
          CheckHostIP no
          ProxyCommand none
          ProxyJump none
      '';

      # darwin-vz-nix writes daemon.log and console.log itself and reopens them when they are renamed, so
      # newsyslog needs no signal (N) and no line is lost. launchd.log is held open by launchd while the job
      # runs; it only gets what is printed before logging starts, so rotating it by rename loses nothing
      # either (lines land in launchd.log.0 until the next start). No compression: a file may still be written
      # for an instant after it was renamed.
      environment.etc."newsyslog.d/darwin-vz-nix.conf".text = ''
        # logfilename                       [owner:group]  mode  count  size(KB)  when  flags
        ${logFile}  root:wheel  640  5  10240  *  N
        ${wd}/console.log  root:wheel  640  5  10240  *  N
        ${launchdLog}  root:wheel  640  3  1024  *  NB
      '';

      # Runs before launchd jobs are (re)loaded, so the state directory and keys exist at the first start.
      # Idempotent; a failure is reported but does not abort the rest of the activation.
      system.activationScripts.extraActivation.text = ''
        echo "setting up darwin-vz-nix state in ${wd}..." >&2
        if ! ${cfg.package}/bin/darwin-vz-nix --state-dir ${escapeShellArg wd} init; then
          echo "warning: darwin-vz-nix init failed; the darwin-vz-nix builder will not work" >&2
        fi
      '';

      launchd.daemons.darwin-vz-nix = {
        path = [ config.nix.package "/usr/bin" "/bin" "/usr/sbin" "/sbin" ];
        serviceConfig = {
          Label = "org.nixos.darwin-vz-nix";
          UserName = "root";
          # /nix may be mounted after launchd starts: wait for it, then exec with the arguments unchanged.
          ProgramArguments = [
            "/bin/sh"
            "-c"
            "/bin/wait4path /nix/store && exec \"$0\" \"$@\""
            "${cfg.package}/bin/darwin-vz-nix"
          ] ++ startArgs;
          WorkingDirectory = wd;
          StandardOutPath = launchdLog;
          StandardErrorPath = launchdLog;
          ProcessType = "Interactive";
          # Time for the guest to shut down cleanly after SIGTERM (launchctl bootout, shutdown).
          ExitTimeOut = 60;
          # On demand: launchd listens and starts the job at the first connection; it is never kept alive,
          # so an idle stop or `darwin-vz-nix stop` sticks until the next connection.
          # Otherwise: start at load, restart only after a failure (exit status != 0), never after an
          # idle stop or `stop` (exit status 0).
          RunAtLoad = !cfg.onDemand;
          KeepAlive = if cfg.onDemand then null else { SuccessfulExit = false; };
          Sockets =
            if cfg.onDemand then {
              Listener = {
                SockNodeName = "127.0.0.1";
                SockServiceName = toString cfg.port;
                SockType = "stream";
                SockFamily = "IPv4";
              };
            } else null;
        };
      };
    }
  ]);
}
