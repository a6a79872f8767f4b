# Declarations of the NixOS options that nix/guest/default.nix sets, with the names and types nixpkgs gives
# them, so that evaluating the guest module with lib.evalModules fails on a misspelt option or a wrong type
# (tests/nix/guest-eval.nix). Each block names the nixpkgs file it mirrors (nixos/modules/...). Types are
# those files' types where nixpkgs lib has them; systemd's unit option type is approximated (see `unitOption`).
# Two assertions are mirrored too, each from the file named next to it.
{ config, lib, ... }:

let
  inherit (lib) mkOption types;
  opt = type: default: mkOption { inherit type default; };
  bool = opt types.bool false;
  strs = opt (types.listOf types.str) [ ];

  # lib/systemd-lib.nix `unitOption`: a value, or a list of values, of a unit file directive.
  unitOption = types.oneOf [ types.bool types.int types.str types.path (types.listOf (types.oneOf [ types.bool types.int types.str types.path ])) ];
  unitSection = opt (types.attrsOf unitOption) { };

  # lib/systemd-unit-options.nix: the options of systemd.services.<name> / sockets.<name> used here.
  unit = types.submodule {
    options = {
      enable = opt types.bool true;
      description = opt types.str "";
      wantedBy = strs;
      requiredBy = strs;
      before = strs;
      after = strs;
      wants = strs;
      requires = strs;
      unitConfig = unitSection;
      serviceConfig = unitSection;
      socketConfig = unitSection;
      path = opt (types.listOf (types.either types.package types.str)) [ ];
      environment = opt (types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]))) { };
      script = opt types.lines "";
    };
  };
  units = opt (types.attrsOf unit) { };
in
{
  options = {
    # misc/assertions.nix
    assertions = opt (types.listOf types.unspecified) [ ];
    warnings = opt (types.listOf types.str) [ ];

    # misc/version.nix
    system.stateVersion = opt types.str "26.05";
    # misc/nixpkgs.nix (hostPlatform: a system string or an elaborated platform)
    nixpkgs.hostPlatform = mkOption { type = types.either types.str types.attrs; };
    # misc/documentation.nix
    documentation.enable = opt types.bool true;

    # tasks/network-interfaces.nix
    networking.hostName = opt (types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$") "nixos";
    networking.useDHCP = opt types.bool true;
    networking.useNetworkd = bool;
    # services/networking/dhcpcd.nix
    networking.dhcpcd.enable = opt types.bool true;
    # services/networking/firewall.nix
    networking.firewall.enable = opt types.bool true;

    # system/boot/loader/grub/grub.nix
    boot.loader.grub.enable = opt types.bool true;
    # system/boot/kernel.nix
    boot.initrd.includeDefaultModules = opt types.bool true;
    boot.initrd.availableKernelModules = strs;
    boot.initrd.kernelModules = strs;
    boot.kernelModules = strs;
    boot.kernelParams = opt (types.listOf (types.strMatching ''([^"[:space:]]|"[^"]*")+'')) [ ];
    # system/boot/stage-1.nix (scripted initrd hooks; asserted unused with systemd stage 1, below)
    boot.initrd.postDeviceCommands = opt types.lines "";
    boot.initrd.postMountCommands = opt types.lines "";
    boot.initrd.extraUtilsCommands = opt types.lines "";
    # system/boot/systemd/initrd.nix
    boot.initrd.systemd.enable = opt types.bool true;
    boot.initrd.systemd.services = units;

    # tasks/filesystems.nix, with tasks/filesystems/overlayfs.nix' `overlay`
    fileSystems = opt
      (types.attrsOf (types.submodule {
        options = {
          device = opt (types.nullOr types.nonEmptyStr) null;
          fsType = opt types.nonEmptyStr "auto";
          options = opt (types.nonEmptyListOf types.nonEmptyStr) [ "defaults" ];
          neededForBoot = bool;
          autoFormat = bool;
          autoResize = bool;
          depends = opt (types.listOf types.nonEmptyStr) [ ];
          overlay = {
            lowerdir = opt (types.nullOr (types.nonEmptyListOf types.str)) null;
            upperdir = opt (types.nullOr types.str) null;
            workdir = opt (types.nullOr types.str) null;
          };
        };
      }))
      { };

    # system/boot/systemd.nix
    systemd.services = units;
    systemd.sockets = units;
    # system/boot/networkd.nix
    systemd.network.wait-online.enable = opt types.bool true;
    systemd.network.networks = opt
      (types.attrsOf (types.submodule {
        options = { matchConfig = unitSection; networkConfig = unitSection; linkConfig = unitSection; };
      }))
      { };

    # services/networking/ssh/sshd.nix
    services.openssh = {
      enable = bool;
      startWhenNeeded = bool;
      openFirewall = opt types.bool true;
      generateHostKeys = bool;
      hostKeys = opt (types.listOf types.attrs) [ ];
      authorizedKeysFiles = strs;
      settings = opt
        (types.submodule {
          freeformType = types.attrsOf unitOption;
          options = {
            PasswordAuthentication = opt (types.nullOr types.bool) true;
            KbdInteractiveAuthentication = opt (types.nullOr types.bool) true;
            PermitRootLogin = opt (types.nullOr (types.enum [ "yes" "without-password" "prohibit-password" "forced-commands-only" "no" ])) "prohibit-password";
            AllowUsers = opt (types.nullOr (types.listOf types.str)) null;
          };
        })
        { };
    };
    # system/boot/timesyncd.nix
    services.timesyncd.enable = opt types.bool true;
    # services/misc/fstrim.nix
    services.fstrim.enable = bool;
    # system/boot/resolved.nix
    services.resolved.enable = bool;

    # config/users-groups.nix (with services/networking/ssh/sshd.nix' openssh.authorizedKeys)
    users.mutableUsers = opt types.bool true;
    users.allowNoPasswordLogin = bool;
    users.users = opt
      (types.attrsOf (types.submodule {
        options = {
          isNormalUser = bool;
          isSystemUser = bool;
          description = opt types.str "";
          group = opt types.str "";
          extraGroups = strs;
          hashedPassword = opt (types.nullOr types.str) null;
          password = opt (types.nullOr types.str) null;
          hashedPasswordFile = opt (types.nullOr types.str) null;
          openssh.authorizedKeys.keys = strs;
          openssh.authorizedKeys.keyFiles = opt (types.listOf types.path) [ ];
        };
      }))
      { };
    # security/sudo.nix
    security.sudo.enable = opt types.bool true;

    # config/nix.nix (`semanticConfType`: a Nix config atom or a list of them; extra-* keys are written
    # after the others)
    nix.settings = opt
      (types.submodule {
        freeformType =
          let atom = types.nullOr (types.oneOf [ types.bool types.int types.float types.str types.path types.package ]);
          in types.attrsOf (types.either atom (types.listOf atom));
      })
      { };
    nix.extraOptions = opt types.lines "";
    nix.package = mkOption { type = types.package; };
  };

  # config/users-groups.nix declares root (no password: login not allowed).
  config.users.users.root.group = "root";
  config.assertions = [
    # config/users-groups.nix: with immutable users, root or a wheel user must be able to log in, unless
    # users.allowNoPasswordLogin. (allowsLogin: a hash other than null, "!", "!!", "*".)
    {
      assertion = !config.users.mutableUsers -> !config.users.allowNoPasswordLogin ->
        lib.any (x: x) (lib.mapAttrsToList
          (name: u: (name == "root" || u.group == "wheel" || lib.elem "wheel" u.extraGroups) && (
            (u.hashedPassword != null && !lib.elem u.hashedPassword [ "!" "!!" "*" ])
              || u.password != null || u.hashedPasswordFile != null
              || u.openssh.authorizedKeys.keys != [ ] || u.openssh.authorizedKeys.keyFiles != [ ]
          ))
          config.users.users);
      message = "Neither the root account nor any wheel user has a password or SSH authorized key.";
    }
    # system/boot/systemd/initrd.nix: scripted-initrd hooks are refused with systemd in stage 1.
    {
      assertion = config.boot.initrd.systemd.enable -> lib.all (h: config.boot.initrd.${h} == "")
        [ "postDeviceCommands" "postMountCommands" "extraUtilsCommands" ];
      message = "systemd stage 1 does not support boot.initrd.postDeviceCommands/postMountCommands/extraUtilsCommands.";
    }
  ];
}
