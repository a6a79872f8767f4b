# Evaluation of the NixOS guest module (nix/guest/default.nix) itself, with nixpkgs lib's evalModules against
# the option declarations of ./nixos-stubs.nix (names and types as nixpkgs declares them), and a rendering of
# the systemd units it declares, with stand-ins for the nixpkgs units they point at, for
# `systemd-analyze verify` (tests/nix/run).
#   (import tests/nix/guest-eval.nix { nixpkgsLib = PATH; }).report 0
# extraModules are added to the guest (tests/nix/run adds a deliberate ordering cycle to see verify fail).
{ nixpkgsLib, extraModules ? [ ] }:

let
  lib = import (nixpkgsLib + "/lib");

  # A stub aarch64-linux pkgs: derivations that are evaluated, never built.
  drv = name: builtins.derivation { inherit name; system = "aarch64-linux"; builder = "/bin/sh"; args = [ "-c" "echo stub >$out" ]; };
  pkgs = lib.genAttrs [ "coreutils" "findutils" "jq" "util-linux" "gnugrep" ] drv // {
    # Named as nixpkgs names it (pname-version): the guest module reads its version.
    nix = drv "nix-2.31.2";
    callPackage = _: _: drv "darwin-vz-nix";
    # pkgs/build-support/trivial-builders: writeShellScript name text -> an executable store file.
    writeShellScript = name: _text: drv name;
  };

  eval = modules: lib.evalModules {
    specialArgs = { modulesPath = ./modules; };
    modules = [
      ./nixos-stubs.nix
      ../../nix/guest
      {
        _module.args.pkgs = pkgs;
        nix.package = pkgs.nix;
        services.darwin-vz-guest.package = drv "darwin-vz-nix";
      }
    ] ++ modules;
  };
  guest = (eval extraModules).config;
  failed = c: map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
  # An evaluation that must fail: the whole config, forced.
  fails = modules: !(builtins.tryEval (builtins.deepSeq (eval modules).config.systemd.services true)).success;

  # --- unit rendering ---
  list = v: if builtins.isList v then v else [ v ];
  value = v: if builtins.isBool v then (if v then "yes" else "no") else toString v;
  section = name: attrs:
    let lines = lib.concatLists (lib.mapAttrsToList (k: v: map (x: "${k}=${value x}") (list v)) attrs);
    in lib.optionalString (lines != [ ]) "[${name}]\n${lib.concatStringsSep "\n" lines}\n";
  unitSection = u: lib.filterAttrs (_: v: v != [ ] && v != "")
    {
      Description = u.description or "";
      After = u.after or [ ];
      Before = u.before or [ ];
      Wants = u.wants or [ ];
      Requires = u.requires or [ ];
    } // (u.unitConfig or { });
  # A service runs nothing here: its script or ExecStart become /bin/true (verify checks the executable).
  service = u: section "Unit" (unitSection u) + section "Service" (
    lib.filterAttrs (n: _: n != "ExecStart") (u.serviceConfig or { }) // { ExecStart = "/bin/true"; }
  );
  socket = u: section "Unit" (unitSection u) + section "Socket" (u.socketConfig or { });
  target = u: section "Unit" (unitSection u);

  # systemd-escape --path (enough for the paths used here; tests/nix/run checks it against systemd-escape).
  escapePath = p: builtins.replaceStrings [ "/" "-" ] [ "-" "\\x2d" ] (lib.removePrefix "/" p);

  # Stage 2 file systems as systemd-fstab-generator writes them: a `nofail` mount is only wanted by
  # local-fs.target and not ordered before it (systemd.mount(5)).
  stage2Fs = lib.filterAttrs (where: fs: !fs.neededForBoot && where != "/") guest.fileSystems;
  mounts = lib.mapAttrs'
    (where: fs:
      let nofail = lib.elem "nofail" fs.options; in
      lib.nameValuePair "${escapePath where}.mount" {
        text = section "Unit" ({ Description = where; } // lib.optionalAttrs (!nofail) { Before = "local-fs.target"; })
          + section "Mount" { What = fs.device; Where = where; Type = fs.fsType; Options = lib.concatStringsSep "," fs.options; };
        wantedBy = [ "local-fs.target" ];
      })
    stage2Fs;

  # Stand-ins for the nixpkgs units the guest's units point at, in the shape the named file gives them.
  # Our module's definitions for the same units (guest.systemd.*) are merged in below.
  standIns = {
    # systemd's own targets (units/*.target in systemd).
    "sysinit.target" = { text = target { description = "System Initialization"; wants = [ "local-fs.target" ]; after = [ "local-fs.target" ]; unitConfig.DefaultDependencies = false; }; };
    "local-fs.target" = { text = target { description = "Local File Systems"; unitConfig.DefaultDependencies = false; }; };
    "sockets.target" = { text = target { description = "Sockets"; }; };
    "basic.target" = { text = target { description = "Basic System"; requires = [ "sysinit.target" ]; wants = [ "sockets.target" ]; after = [ "sysinit.target" "sockets.target" ]; }; };
    "network.target" = { text = target { description = "Network"; }; };
    "multi-user.target" = { text = target { description = "Multi-User System"; requires = [ "basic.target" ]; after = [ "basic.target" ]; }; };
  };
  # services/networking/ssh/sshd.nix (startWhenNeeded): sshd.socket, wanted by sockets.target, Accept=yes,
  # and sshd@.service after network.target; services/system/nix-daemon.nix: nix-daemon.socket and service.
  nixpkgsUnits = {
    sockets.sshd = { description = "SSH Socket"; wantedBy = [ "sockets.target" ]; socketConfig = { Accept = true; } // guest.systemd.sockets.sshd.socketConfig; };
    services."sshd@" = { description = "SSH per-connection Daemon"; after = [ "network.target" ]; serviceConfig.StandardInput = "socket"; };
    sockets.nix-daemon = { description = "Nix Daemon Socket"; wantedBy = [ "sockets.target" ]; socketConfig.ListenStream = "/nix/var/nix/daemon-socket/socket"; };
    services.nix-daemon = { description = "Nix Daemon"; };
  };
  merge = a: b: lib.zipAttrsWith
    (_: vs:
      if builtins.isList (lib.head vs) then lib.concatLists vs
      else if builtins.isAttrs (lib.head vs) then lib.foldl' (x: y: x // y) { } vs
      else lib.findFirst (x: x != "") "" (lib.reverseList vs))
    [ a b ];
  ours = kind: lib.mapAttrs (_: u: lib.filterAttrs (n: _: lib.elem n [ "description" "wantedBy" "after" "before" "wants" "requires" "unitConfig" "serviceConfig" "socketConfig" ]) u) guest.systemd.${kind};
  allOf = kind: lib.zipAttrsWith (_: vs: lib.foldl' merge { } vs) [ (nixpkgsUnits.${kind} or { }) (ours kind) ];
  stage2 = standIns // mounts
    // lib.mapAttrs' (n: u: lib.nameValuePair "${n}.service" { text = service u; wantedBy = u.wantedBy or [ ]; }) (allOf "services")
    // lib.mapAttrs' (n: u: lib.nameValuePair "${n}.socket" { text = socket u; wantedBy = u.wantedBy or [ ]; }) (allOf "sockets");
  # Files: name -> text, plus `<target>.wants/<unit>` links, as NixOS links wantedBy (systemd-lib.nix).
  render = units: {
    files = lib.mapAttrs (_: u: u.text) units;
    links = lib.concatLists (lib.mapAttrsToList (n: u: map (t: "${t}.wants/${n}") (u.wantedBy or [ ])) units);
  };

  # Stage 1: the initrd unit, with stand-ins for systemd's initrd units it is ordered against.
  stage1 = lib.mapAttrs (_: text: { inherit text; })
    {
      "initrd-root-device.target" = target { description = "Initrd Root Device"; unitConfig.DefaultDependencies = false; };
      "systemd-modules-load.service" = service { description = "Load Kernel Modules"; unitConfig.DefaultDependencies = false; serviceConfig.Type = "oneshot"; };
      "systemd-makefs@.service" = service { description = "Make File System on %f"; unitConfig.DefaultDependencies = false; serviceConfig.Type = "oneshot"; };
      "sysroot.mount" = section "Unit" { Description = "/sysroot"; After = "systemd-makefs@dev-vda.service"; Wants = "systemd-makefs@dev-vda.service"; } + section "Mount" { What = "/dev/vda"; Where = "/sysroot"; Type = "ext4"; };
    } // lib.mapAttrs' (n: u: lib.nameValuePair "${n}.service" { text = service u; wantedBy = u.wantedBy; })
    (lib.mapAttrs (_: u: lib.filterAttrs (k: _: k != "requires") u // { requires = lib.filter (r: !lib.hasSuffix ".device" r) u.requires; })
      guest.boot.initrd.systemd.services);

  plain = builtins.unsafeDiscardStringContext;

  # --- host-store queries ---
  setupScript = plain guest.systemd.services.dvn-setup.script;
  # The store URL dvn-setup hands to ./store-setup.sh (one shell-quoted argument), and the hook it names.
  storeUrl = builtins.match ".*dvn_store_setup [^ ]+ /run/dvn '([^']*)' .*" setupScript;
  # The same for a guest with another nix.package.
  withNix = name: with (eval [{ nix.package = lib.mkForce (drv name); }]).config; {
    inherit (services.darwin-vz-guest) hostStoreQueries;
    url = builtins.match ".*dvn_store_setup [^ ]+ /run/dvn '([^']*)' .*" (plain systemd.services.dvn-setup.script) != [ "" ];
  };
  hookPath = builtins.match ".*&remount-hook=(/nix/store/[a-z0-9]+-dvn-remount-hook)'.*" setupScript;
  # Every directive value of every stage 2 unit (Environment= included): systemd expands `%` in them.
  directives = lib.concatLists (lib.mapAttrsToList
    (_: u: lib.concatMap (v: map (x: plain (toString x)) (list v))
      (lib.concatMap lib.attrValues [ (u.unitConfig or { }) (u.serviceConfig or { }) (u.socketConfig or { }) (u.environment or { }) ]))
    (guest.systemd.services // guest.systemd.sockets));
  # A `%` not doubled: a systemd specifier, which none of our directives means to use.
  hasSpecifier = v: builtins.match ".*%.*" (builtins.replaceStrings [ "%%" ] [ "" ] v) != null;

  cases = [
    {
      name = "guest module evaluates against the nixpkgs option declarations, no failed assertions";
      got = failed guest;
      expected = [ ];
    }
    {
      name = "a misspelt option fails the evaluation (services.openssh.startWhenNeded)";
      got = fails [{ services.openssh.startWhenNeded = true; }];
      expected = true;
    }
    {
      name = "a wrong type fails the evaluation (services.darwin-vz-guest.agentPort = \"1023\")";
      got = fails [{ services.darwin-vz-guest.agentPort = lib.mkForce "1023"; }];
      expected = true;
    }
    {
      name = "item 1: without allowNoPasswordLogin, users-groups.nix' lock-out assertion fails";
      got = failed (eval [{ users.allowNoPasswordLogin = lib.mkForce false; }]).config;
      expected = [ "Neither the root account nor any wheel user has a password or SSH authorized key." ];
    }
    {
      name = "item 4: systemd initrd, no scripted-initrd hook";
      got = { inherit (guest.boot.initrd.systemd) enable; inherit (guest.boot.initrd) postDeviceCommands postMountCommands extraUtilsCommands; };
      expected = { enable = true; postDeviceCommands = ""; postMountCommands = ""; extraUtilsCommands = ""; };
    }
    {
      name = "item 4: root formatted when blank and grown; store is an overlay over the required nix-store share";
      got = {
        root = { inherit (guest.fileSystems."/") device fsType autoFormat autoResize; };
        ro = { inherit (guest.fileSystems."/nix/.ro-store") device fsType options neededForBoot; };
        store = { inherit (guest.fileSystems."/nix/store") overlay neededForBoot; };
      };
      expected = {
        root = { device = "/dev/vda"; fsType = "ext4"; autoFormat = true; autoResize = true; };
        ro = { device = "nix-store"; fsType = "virtiofs"; options = [ "ro" ]; neededForBoot = true; };
        store = { overlay = { lowerdir = [ "/nix/.ro-store" ]; upperdir = "/nix/.rw-store/store"; workdir = "/nix/.rw-store/work"; }; neededForBoot = true; };
      };
    }
    {
      name = "item 5: systemd-ssh-generator off (systemd.ssh_auto=no); sshd only on vsock 22; no sshd-keygen";
      got = { params = guest.boot.kernelParams; listen = guest.systemd.sockets.sshd.socketConfig.ListenStream; inherit (guest.services.openssh) generateHostKeys startWhenNeeded; };
      expected = { params = [ "console=hvc0" "systemd.ssh_auto=no" ]; listen = [ "vsock::22" ]; generateHostKeys = false; startWhenNeeded = true; };
    }
    {
      name = "item 3: dvn-setup wants and follows both share mounts (nofail: not before local-fs.target)";
      got = { inherit (guest.systemd.services.dvn-setup) wants after; mounts = builtins.attrNames mounts; };
      expected = { wants = [ "run-dvn\\x2dconfig.mount" "run-rosetta.mount" ]; after = [ "run-dvn\\x2dconfig.mount" "run-rosetta.mount" ]; mounts = [ "run-dvn\\x2dconfig.mount" "run-rosetta.mount" ]; };
    }
    {
      name = "agent on privileged vsock port 1023";
      got = lib.hasInfix " --port 1023 " (plain guest.systemd.services.dvn-agent.serviceConfig.ExecStart);
      expected = true;
    }
    {
      name = "fast boot: networkd, no wait-online, no dhcpcd, no firewall, only the needed initrd modules";
      got = {
        inherit (guest.networking) useNetworkd useDHCP;
        dhcpcd = guest.networking.dhcpcd.enable;
        firewall = guest.networking.firewall.enable;
        waitOnline = guest.systemd.network.wait-online.enable;
        inherit (guest.boot.initrd) includeDefaultModules availableKernelModules kernelModules;
      };
      expected = {
        useNetworkd = true;
        useDHCP = false;
        dhcpcd = false;
        firewall = false;
        waitOnline = false;
        includeDefaultModules = false;
        availableKernelModules = [ "virtio_pci" "virtio_blk" "virtio_console" ];
        kernelModules = [ "virtiofs" "overlay" ];
      };
    }
    {
      name = "host store: dvn-host-store.socket (root only, one bridge per connection) and dvn-host-store@.service";
      got = {
        socket = { inherit (guest.systemd.sockets.dvn-host-store) socketConfig wantedBy; };
        bridge = with guest.systemd.services."dvn-host-store@"; {
          inherit wants after;
          exec = plain serviceConfig.ExecStart;
          inherit (serviceConfig) EnvironmentFile StandardInput StandardOutput;
          inherit (unitConfig) ConditionPathExists;
        };
      };
      expected = {
        socket = { socketConfig = { ListenStream = "/run/dvn/host-store.sock"; SocketMode = "0600"; Accept = true; }; wantedBy = [ "sockets.target" ]; };
        bridge = {
          wants = [ "dvn-setup.service" ];
          after = [ "dvn-setup.service" ];
          exec = "${plain (drv "darwin-vz-nix")}/bin/dvn-agent host-bridge --port \${DVN_HOST_STORE_PORT}";
          EnvironmentFile = "/run/dvn/host-store.env";
          StandardInput = "socket";
          StandardOutput = "socket";
          ConditionPathExists = "/run/dvn/host-store.env";
        };
      };
    }
    {
      name = "host store: nix-daemon's ExecStart reset, --store from /run/dvn/nix-daemon.env (auto without it)";
      got = with guest.systemd.services.nix-daemon; {
        exec = map plain serviceConfig.ExecStart;
        inherit (serviceConfig) EnvironmentFile;
        inherit environment after wants;
      };
      expected = {
        exec = [ "" "${plain pkgs.nix}/bin/nix-daemon --daemon --store \${DVN_NIX_DAEMON_STORE}" ];
        EnvironmentFile = "-/run/dvn/nix-daemon.env";
        environment = { DVN_NIX_DAEMON_STORE = "auto"; };
        after = [ "dvn-setup.service" ];
        wants = [ "dvn-setup.service" ];
      };
    }
    {
      name = "host store: the local-overlay store URL dvn-setup writes (lower store = the bridge socket, upper = the overlay's)";
      got = {
        url = storeUrl;
        hook = hookPath != null;
      };
      expected = {
        url = [ "local-overlay://?lower-store=unix%3A%2F%2F%2Frun%2Fdvn%2Fhost-store.sock&upper-layer=/nix/.rw-store/store&check-mount=false&remount-hook=${lib.head hookPath}" ];
        hook = true;
      };
    }
    {
      name = "host store: only a Nix with the local-overlay store (>= 2.19, not Lix) uses it; otherwise the offer is ignored";
      got = map withNix [ "nix-2.31.2" "nix-2.19.0" "nix-2.18.9" "lix-2.93.0" ];
      expected = [
        { hostStoreQueries = true; url = true; }
        { hostStoreQueries = true; url = true; }
        { hostStoreQueries = false; url = false; }
        { hostStoreQueries = false; url = false; }
      ];
    }
    {
      name = "host store: no unit directive holds a single % (systemd specifier); the URL's % go through the env file";
      got = {
        specifiers = lib.filter hasSpecifier directives;
        urlHasPercent = lib.hasInfix "%" (lib.head storeUrl);
        checkWorks = hasSpecifier "a%3A" && !hasSpecifier "a%%3A";
      };
      expected = { specifiers = [ ]; urlHasPercent = true; checkWorks = true; };
    }
    {
      name = "host store: nix.conf enables local-overlay-store; min-free only through store-setup.sh (GC rule)";
      got = {
        inherit (guest.nix.settings) extra-experimental-features;
        # min-free/max-free are written by ./store-setup.sh (tests/nix/run runs it), nowhere else.
        minFreeInScript = lib.hasInfix "min-free" setupScript;
        minFreeInSettings = guest.nix.settings ? min-free || lib.hasInfix "min-free" guest.nix.extraOptions;
        sourced = builtins.match ".*\\. /nix/store/[a-z0-9]+-store-setup\\.sh\n.*" setupScript != null;
        repairAtBoot = lib.hasInfix "${lib.head hookPath} --if-removed /nix/store" setupScript;
      };
      expected = {
        extra-experimental-features = [ "local-overlay-store" ];
        minFreeInScript = false;
        minFreeInSettings = false;
        sourced = true;
        repairAtBoot = true;
      };
    }
  ];

in
import ./report.nix cases // {
  # For tests/nix/run: unit files to run `systemd-analyze verify` on, and the mount points whose unit names
  # must match `systemd-escape -p --suffix=mount`.
  units = { stage2 = render stage2; stage1 = render stage1; };
  mountPoints = lib.mapAttrs' (where: _: lib.nameValuePair where "${escapePath where}.mount") stage2Fs;
}
