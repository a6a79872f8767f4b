# Evaluation tests of the nix-darwin module against real nix-darwin and nixpkgs lib, with a stub pkgs.
#   (import tests/nix/eval.nix { nixDarwin = PATH; nixpkgsLib = PATH; }).report 0
# Returns { names = [ case names ]; report = i: "ok" or what went wrong in case i; } (see tests/nix/run).
{ nixDarwin, nixpkgsLib }:

let
  lib = import (nixpkgsLib + "/lib");
  stub = import ./stub-pkgs.nix { inherit lib; };
  module = ../../nix/darwin/module.nix;

  paths = {
    kernelPath = "/guest/Image";
    initrdPath = "/guest/initrd";
    systemPath = "/guest/system";
  };

  evalWith = modules: (import (nixDarwin + "/eval-config.nix") {
    inherit lib;
    # The two snapshots need not be from matching release branches.
    enableNixpkgsReleaseCheck = false;
    modules = [
      module
      {
        _module.args.pkgs = lib.mkForce stub;
        system.stateVersion = 6;
        services.darwin-vz.enable = true;
        services.darwin-vz.package = stub.darwin-vz-nix;
      }
    ] ++ modules;
  }).config;

  withPaths = opts: evalWith [{ services.darwin-vz = paths // opts; }];

  daemon = c: c.launchd.daemons.darwin-vz-nix.serviceConfig;
  args = c: lib.drop 4 (daemon c).ProgramArguments;
  # A flag and the value after it, wherever the flag is.
  argAfter = flag: c: lib.elemAt (args c) (lib.lists.findFirstIndex (a: a == flag) null (args c) + 1);
  flagWith = flag: c: [ flag (argAfter flag c) ];
  machine = c: builtins.head c.nix.buildMachines;
  sshConfig = c: c.environment.etc."ssh/ssh_config.d/0-darwin-vz-nix.conf".text;
  # /etc/ssh/ssh_config.d/* in the order ssh reads them (lexical, as glob(3) returns them).
  sshConfigD = c: lib.sort (a: b: a < b)
    (lib.filter (lib.hasPrefix "ssh/ssh_config.d/") (builtins.attrNames c.environment.etc));
  plist = c: c.environment.launchDaemons."org.nixos.darwin-vz-nix.plist".text;
  nonNull = v: if builtins.isAttrs v then lib.filterAttrs (_: x: x != null) v else v;
  failed = c: map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
  failedOurs = c: lib.filter (lib.hasInfix "services.darwin-vz") (failed c);
  # Store paths in strings carry context, which builtins.match refuses: compare plain strings.
  plain = builtins.unsafeDiscardStringContext;
  has = infix: s: lib.hasInfix (plain infix) (plain s);

  # A fake `nixosSystem` result: extendModules evaluates the extra module, so the tests can see it applied.
  fakeGuest = {
    extendModules = { modules }:
      let
        m = lib.evalModules {
          modules = [{ options.marker = lib.mkOption { type = lib.types.str; default = "base"; }; }] ++ modules;
        };
      in
      { config.system.build.toplevel = stub.writeText "guest-${m.config.marker}" ""; };
  };

  defaults = withPaths { };
  noRosetta = withPaths { rosetta = false; };
  notOnDemand = withPaths { onDemand = false; };
  port2222 = withPaths { port = 2222; };
  ephemeral = withPaths { ephemeral = true; verbose = true; };
  cores8 = withPaths { cores = 8; memory = 16384; diskSize = "512G"; idleTimeout = 0; };
  withLinuxBuilder = evalWith [
    { services.darwin-vz = paths; nix.linux-builder.enable = true; }
  ];
  badDisk = d: failedOurs (withPaths { diskSize = d; });
  customGuest = evalWith [{
    services.darwin-vz.guestConfiguration = fakeGuest;
    services.darwin-vz.extraNixOSConfig = { marker = "custom"; };
  }];
  extraWithoutGuest = withPaths { extraNixOSConfig = { marker = "x"; }; };
  noPaths = evalWith [ ];
  queriesOff = withPaths { hostStoreQueries.enable = false; };
  customSocket = withPaths { hostStoreQueries.daemonSocket = "/var/run/other-nix/daemon.sock"; };
  # The value after --host-nix-daemon.
  hostDaemonArg = c: argAfter "--host-nix-daemon" c;
  # Determinate Nix: nix-darwin's Nix management off.
  determinate = evalWith [{ services.darwin-vz = paths; nix.enable = false; }];
  # A user's nix-darwin ssh settings that would break the pin if they were read first (tests/nix/run also
  # resolves them with `ssh -G`).
  userSsh = evalWith [{
    services.darwin-vz = paths;
    programs.ssh.extraConfig = ''
      Host *
        StrictHostKeyChecking no
        UserKnownHostsFile ~/.ssh/known_hosts
        GlobalKnownHostsFile /etc/ssh/ssh_known_hosts
        HostKeyAlias elsewhere
        User someone
        Port 22
        ProxyJump bastion.example
        UpdateHostKeys yes
    '';
  }];

  # The flake's darwinModules.default, with a stand-in nixpkgs input (callPackage -> stub package,
  # nixosSystem -> fakeGuest): package and guest paths must default from the flake.
  flake =
    let
      fakeNixpkgs = {
        lib = lib // { nixosSystem = _: fakeGuest; };
        legacyPackages = lib.genAttrs [ "aarch64-darwin" "x86_64-linux" "aarch64-linux" ]
          (_: stub // { callPackage = _: _: stub.darwin-vz-nix; });
      };
      outputs = (import ../../flake.nix).outputs { self = outputs; nixpkgs = fakeNixpkgs; };
    in
    outputs;
  fromFlake = (import (nixDarwin + "/eval-config.nix") {
    inherit lib;
    enableNixpkgsReleaseCheck = false;
    modules = [
      flake.darwinModules.default
      { _module.args.pkgs = lib.mkForce stub; system.stateVersion = 6; services.darwin-vz.enable = true; }
    ];
  }).config;

  expectedDefaultArgs = [
    "--state-dir"
    "/var/lib/darwin-vz-nix"
    "start"
    "--cores"
    "4"
    "--memory"
    "8192"
    "--disk-size"
    "100G"
    "--kernel"
    "/guest/Image"
    "--initrd"
    "/guest/initrd"
    "--system"
    "/guest/system"
    "--share-nix-store"
    "--host-nix-daemon"
    "/nix/var/nix/daemon-socket/socket"
    "--idle-timeout"
    "180"
    "--rosetta"
    "--port"
    "31122"
    "--max-jobs"
    "4"
    "--log-file"
    "/var/lib/darwin-vz-nix/daemon.log"
    "--on-demand"
  ];

  cases = [
    {
      name = "defaults: launchd ProgramArguments carry every flag";
      got = args defaults;
      expected = expectedDefaultArgs;
    }
    {
      name = "defaults: launchd waits for /nix/store and execs the package binary";
      got = lib.take 4 (daemon defaults).ProgramArguments;
      expected = [ "/bin/sh" "-c" "/bin/wait4path /nix/store && exec \"$0\" \"$@\"" "${stub.darwin-vz-nix}/bin/darwin-vz-nix" ];
    }
    {
      name = "defaults: on demand = launchd socket on 127.0.0.1:31122, no RunAtLoad, no KeepAlive";
      got = {
        inherit (daemon defaults) RunAtLoad KeepAlive Label UserName StandardOutPath StandardErrorPath;
        listener = nonNull (daemon defaults).Sockets.Listener;
      };
      expected = {
        RunAtLoad = false;
        KeepAlive = null;
        Label = "org.nixos.darwin-vz-nix";
        UserName = "root";
        StandardOutPath = "/var/lib/darwin-vz-nix/launchd.log";
        StandardErrorPath = "/var/lib/darwin-vz-nix/launchd.log";
        listener = { SockNodeName = "127.0.0.1"; SockServiceName = "31122"; SockType = "stream"; SockFamily = "IPv4"; };
      };
    }
    {
      name = "defaults: rendered plist has Sockets and no KeepAlive";
      got = { sockets = has "<key>Sockets</key>" (plist defaults); keepAlive = has "KeepAlive" (plist defaults); };
      expected = { sockets = true; keepAlive = false; };
    }
    {
      name = "defaults: one build machine, aarch64 + x86_64 (rosetta), no kvm";
      got = lib.filterAttrs (n: _: n != "system") (machine defaults);
      expected = {
        hostName = "darwin-vz-nix";
        sshUser = "builder";
        sshKey = "/var/lib/darwin-vz-nix/ssh/id_ed25519";
        systems = [ "aarch64-linux" "x86_64-linux" ];
        maxJobs = 4;
        speedFactor = 1;
        supportedFeatures = [ "benchmark" "big-parallel" ];
        mandatoryFeatures = [ ];
        protocol = "ssh-ng";
        publicHostKey = null;
      };
    }
    {
      name = "defaults: distributed builds with substitutes, nix/machines written";
      got = {
        inherit (defaults.nix) distributedBuilds;
        inherit (defaults.nix.settings) builders-use-substitutes;
        machines = has "darwin-vz-nix aarch64-linux,x86_64-linux /var/lib/darwin-vz-nix/ssh/id_ed25519 4 1 benchmark,big-parallel"
          defaults.environment.etc."nix/machines".text;
      };
      expected = { distributedBuilds = true; builders-use-substitutes = true; machines = true; };
    }
    {
      name = "defaults: ssh_config pins the guest host key at 127.0.0.1:31122";
      got = sshConfig defaults;
      expected = ''
        Host darwin-vz-nix
          HostName 127.0.0.1
          Port 31122
          User builder
          IdentityFile /var/lib/darwin-vz-nix/ssh/id_ed25519
          IdentitiesOnly yes
          HostKeyAlias darwin-vz-nix
          UserKnownHostsFile /var/lib/darwin-vz-nix/ssh/known_hosts
          GlobalKnownHostsFile /dev/null
          StrictHostKeyChecking yes
          UpdateHostKeys no
          CheckHostIP no
          ProxyCommand none
          ProxyJump none
      '';
    }
    {
      name = "ssh pin: read before nix-darwin's 100-nix-darwin.conf, whose `Host *` would otherwise win";
      got = sshConfigD userSsh;
      expected = [ "ssh/ssh_config.d/0-darwin-vz-nix.conf" "ssh/ssh_config.d/100-nix-darwin.conf" ];
    }
    {
      name = "defaults: activation runs `init` in a step nix-darwin runs (extraActivation)";
      got = {
        init = has "${stub.darwin-vz-nix}/bin/darwin-vz-nix --state-dir /var/lib/darwin-vz-nix init" defaults.system.activationScripts.extraActivation.text;
        inScript = has "\${cfg.activationScripts.extraActivation.text}" (builtins.readFile (nixDarwin + "/modules/system/activation-scripts.nix"));
      };
      expected = { init = true; inScript = true; };
    }
    {
      name = "defaults: newsyslog rotates the logs without signal or compression";
      got = map
        (line: builtins.match ".*\n(${line})\n.*" defaults.environment.etc."newsyslog.d/darwin-vz-nix.conf".text != null)
        [
          "/var/lib/darwin-vz-nix/daemon.log +root:wheel +640 +5 +10240 +\\* +N"
          "/var/lib/darwin-vz-nix/console.log +root:wheel +640 +5 +10240 +\\* +N"
          "/var/lib/darwin-vz-nix/launchd.log +root:wheel +640 +3 +1024 +\\* +NB"
        ];
      expected = [ true true true ];
    }
    {
      name = "defaults: no failed assertions, no warnings";
      got = { failed = failed defaults; inherit (defaults) warnings; };
      expected = { failed = [ ]; warnings = [ ]; };
    }
    {
      name = "rosetta off: aarch64-linux only, --no-rosetta";
      got = { inherit ((machine noRosetta)) systems; flag = builtins.elem "--no-rosetta" (args noRosetta); on = builtins.elem "--rosetta" (args noRosetta); };
      expected = { systems = [ "aarch64-linux" ]; flag = true; on = false; };
    }
    {
      name = "onDemand off: RunAtLoad, restart only on failure, no socket, no --on-demand";
      got = { inherit (daemon notOnDemand) RunAtLoad Sockets; keepAlive = nonNull (daemon notOnDemand).KeepAlive; onDemand = builtins.elem "--on-demand" (args notOnDemand); };
      expected = { RunAtLoad = true; Sockets = null; keepAlive = { SuccessfulExit = false; }; onDemand = false; };
    }
    {
      name = "onDemand off: rendered plist has KeepAlive SuccessfulExit false";
      got = has "<key>KeepAlive</key>\n\t<dict>\n\t\t<key>SuccessfulExit</key>\n\t\t<false/>" (plist notOnDemand);
      expected = true;
    }
    {
      name = "custom port: socket, ssh_config and --port agree";
      got = { sock = (daemon port2222).Sockets.Listener.SockServiceName; ssh = has "\n  Port 2222\n" (sshConfig port2222); arg = flagWith "--port" port2222; };
      expected = { sock = "2222"; ssh = true; arg = [ "--port" "2222" ]; };
    }
    {
      name = "ephemeral + verbose are passed to start";
      # expectedDefaultArgs ends with --on-demand: what follows it.
      got = lib.drop (builtins.length expectedDefaultArgs - 1) (args ephemeral);
      expected = [ "--on-demand" "--ephemeral" "--verbose" ];
    }
    {
      name = "cores 8: maxJobs follows cores; sizes and idle timeout 0 passed";
      got = { inherit ((machine cores8)) maxJobs; a = lib.sublist 3 6 (args cores8); idle = flagWith "--idle-timeout" cores8; j = flagWith "--max-jobs" cores8; };
      expected = { maxJobs = 8; a = [ "--cores" "8" "--memory" "16384" "--disk-size" "512G" ]; idle = [ "--idle-timeout" "0" ]; j = [ "--max-jobs" "8" ]; };
    }
    {
      name = "assertion: nix.linux-builder.enable conflicts";
      got = builtins.any (has "nix.linux-builder cannot both be enabled") (failed withLinuxBuilder);
      expected = true;
    }
    {
      name = "assertion: diskSize syntax (100GB, 0, 10 G rejected; 512M, 1073741824, 2t accepted)";
      got = map (d: badDisk d != [ ]) [ "100GB" "0" "10 G" "512M" "1073741824" "2t" ];
      expected = [ true true true false false false ];
    }
    {
      name = "guestConfiguration + extraNixOSConfig: paths default from the extended guest";
      got = with customGuest.services.darwin-vz; {
        custom = has "-guest-custom" systemPath;
        kernel = kernelPath == "${systemPath}/kernel";
        initrd = initrdPath == "${systemPath}/initrd";
        failed = failed customGuest;
      };
      expected = { custom = true; kernel = true; initrd = true; failed = [ ]; };
    }
    {
      name = "extraNixOSConfig without guestConfiguration fails; with explicit paths it would be ignored";
      got = {
        assertion = builtins.any (has "extraNixOSConfig needs") (failedOurs extraWithoutGuest);
        warning = builtins.any (has "extraNixOSConfig has no effect") extraWithoutGuest.warnings;
      };
      expected = { assertion = true; warning = true; };
    }
    {
      name = "kernelPath is required without guestConfiguration";
      got = (builtins.tryEval (builtins.deepSeq (args noPaths) true)).success;
      expected = false;
    }
    {
      name = "host-store queries: on by default with nix-darwin's daemon socket, off = none, custom socket passed";
      got = {
        default = hostDaemonArg defaults;
        off = hostDaemonArg queriesOff;
        custom = hostDaemonArg customSocket;
        once = lib.count (a: a == "--host-nix-daemon") (args customSocket);
        share = lib.elem "--share-nix-store" (args queriesOff);
        failed = failed queriesOff ++ failed customSocket;
      };
      expected = {
        default = "/nix/var/nix/daemon-socket/socket";
        off = "none";
        custom = "/var/run/other-nix/daemon.sock";
        once = 1;
        share = true;
        failed = [ ];
      };
    }
    {
      name = "host-store queries: the socket must be an absolute path (not \"none\", not relative); unchecked when off";
      got = map (o: failedOurs (withPaths { hostStoreQueries = o; })) [
        { daemonSocket = "none"; }
        { daemonSocket = "nix/daemon.sock"; }
        { daemonSocket = "/tmp/a\nb"; }
        { enable = false; daemonSocket = "none"; }
      ];
      expected =
        let msg = [ "services.darwin-vz.hostStoreQueries.daemonSocket must be an absolute path (to turn the queries off, set hostStoreQueries.enable = false)." ];
        in [ msg msg msg [ ] ];
    }
    {
      name = "host-store queries: the build machine and ssh pin are the same on and off";
      got = { machine = machine queriesOff == machine defaults; ssh = sshConfig queriesOff == sshConfig defaults; };
      expected = { machine = true; ssh = true; };
    }
    {
      name = "Determinate Nix (nix.enable = false): the module is refused as a whole";
      got = failedOurs determinate;
      expected = [ "services.darwin-vz requires nix.enable (it configures nix.buildMachines)." ];
    }
    {
      name = "kvm in supportedFeatures warns (no nested virtualization)";
      got = builtins.any (has "no nested virtualization") (withPaths { supportedFeatures = [ "kvm" ]; }).warnings;
      expected = true;
    }
    {
      name = "custom workingDirectory is used everywhere; relative one rejected";
      got = {
        inherit ((machine (withPaths { workingDirectory = "/opt/dvn"; }))) sshKey;
        state = lib.take 2 (args (withPaths { workingDirectory = "/opt/dvn"; }));
        relative = failedOurs (withPaths { workingDirectory = "var/dvn"; }) != [ ];
      };
      expected = { sshKey = "/opt/dvn/ssh/id_ed25519"; state = [ "--state-dir" "/opt/dvn" ]; relative = true; };
    }
    {
      name = "flake darwinModules.default: package and guest paths default from the flake";
      got = {
        bin = builtins.elemAt (daemon fromFlake).ProgramArguments 3;
        system = has "-guest-base" fromFlake.services.darwin-vz.systemPath;
        failed = failed fromFlake;
      };
      expected = { bin = "${stub.darwin-vz-nix}/bin/darwin-vz-nix"; system = true; failed = [ ]; };
    }
  ];

in
import ./report.nix cases // {
  # For tests/nix/run's `ssh -G` check: the ssh_config.d files of `userSsh`, in reading order.
  sshConfigFiles = map (n: { name = baseNameOf n; inherit (userSsh.environment.etc.${n}) text; }) (sshConfigD userSsh);
}
