# A stub `pkgs` for evaluating nix-darwin modules without nixpkgs: fake derivations made with
# builtins.derivation (evaluated, never built). Only what nix-darwin and our module touch while the tests
# read launchd.daemons, nix.buildMachines, environment.etc, activation scripts, assertions and warnings.
{ lib }:

let
  system = "aarch64-darwin";

  drv = name: extra: builtins.derivation
    ({
      inherit name system;
      builder = "/bin/sh";
      args = [ "-c" "echo stub >$out" ];
    }) // { meta = { }; } // extra;

  pkg = name: drv name { pname = name; version = "0"; };

  text = name: content: drv name { inherit content; };

  hostPlatform = lib.systems.elaborate system;

  self = {
    inherit lib;
    stdenv = {
      inherit hostPlatform;
      buildPlatform = hostPlatform;
      targetPlatform = hostPlatform;
      isDarwin = true;
      isLinux = false;
      shell = "/bin/sh";
      system = system;
    };
    stdenvNoCC = self.stdenv;
    buildPlatform = hostPlatform;
    hostPlatform = hostPlatform;
    targetPlatform = hostPlatform;
    system = system;
    __splicedPackages = self;
    appendOverlays = _: self;

    # Our own package, as the flake would provide it.
    darwin-vz-nix = pkg "darwin-vz-nix-0.1.0";

    # nix needs a real version string (nix-darwin compares it).
    nix = drv "nix-2.28.3" { pname = "nix"; version = "2.28.3"; };

    writeText = text;
    writeScript = text;
    writeShellScript = text;
    writeScriptBin = text;
    writeShellScriptBin = text;
    writeTextDir = text;
    writeTextFile = { name, text ? "", ... }: drv name { content = text; };
    runCommand = name: _env: _cmd: drv name { };
    runCommandLocal = name: _env: _cmd: drv name { };
    runCommandNoCC = name: _env: _cmd: drv name { };
    buildEnv = { name, ... }: drv name { };
    symlinkJoin = { name, ... }: drv name { };
    substituteAll = { name ? "substituted", ... }: drv name { };
    replaceVars = src: _: drv (baseNameOf (toString src)) { };
    makeWrapper = pkg "make-wrapper";
    # nix.linux-builder's package, for the test that enables it next to ours.
    darwin.linux-builder =
      let
        lb = drv "linux-builder" {
          nixosConfig = {
            networking.hostName = "linux-builder";
            nixpkgs.hostPlatform.system = "aarch64-linux";
            virtualisation = { cores = 1; darwin-builder.memorySize = 3072; };
          };
          nixosOptions = { };
          override = _: lb;
        };
      in
      lb;
  } // lib.genAttrs [
    "bash"
    "coreutils"
    "gnugrep"
    "gnused"
    "findutils"
    "darwin-rebuild"
    "darwin-option"
    "darwin-version"
    "darwin-uninstaller"
    "cacert"
    "openssh"
    "tmux"
    "vim"
    "zsh"
    "less"
    "man"
    "texinfo"
    "nano"
    "shadow"
    "curl"
    "jq"
    "xcbuild"
    "gettext"
  ]
    pkg;
in
self
