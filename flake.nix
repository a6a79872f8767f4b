{
  description = "darwin-vz-nix: a NixOS Linux builder VM for macOS (Virtualization.framework) and Linux (QEMU)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixpkgs-unstable";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "aarch64-darwin" "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      guest = self.nixosConfigurations.darwin-vz-guest.config.system.build;
    in
    {
      packages = forAllSystems (pkgs:
        let
          darwin-vz-nix = pkgs.callPackage ./nix/package.nix { };
        in
        {
          inherit darwin-vz-nix;
          default = darwin-vz-nix;
        } // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "aarch64-linux") {
          # guest-kernel/Image, guest-initrd/initrd, guest-system (toplevel: init, kernel-params, kernel, initrd)
          guest-kernel = guest.kernel;
          guest-initrd = guest.initialRamdisk;
          guest-system = guest.toplevel;
        });

      nixosModules.guest = import ./nix/guest;
      nixosModules.default = self.nixosModules.guest;

      nixosConfigurations.darwin-vz-guest = lib.nixosSystem {
        modules = [
          self.nixosModules.guest
          {
            nixpkgs.hostPlatform = "aarch64-linux";
            services.darwin-vz-guest.package = self.packages.aarch64-linux.darwin-vz-nix;
          }
        ];
      };

      # The nix-darwin module, with this flake's package and guest as defaults.
      darwinModules.default = { lib, pkgs, ... }: {
        imports = [ ./nix/darwin/module.nix ];
        services.darwin-vz = {
          package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.darwin-vz-nix;
          guestConfiguration = lib.mkDefault self.nixosConfigurations.darwin-vz-guest;
        };
      };
      darwinModules.darwin-vz = self.darwinModules.default;

      apps = forAllSystems (pkgs:
        let
          app = {
            type = "app";
            program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.darwin-vz-nix}/bin/darwin-vz-nix";
          };
        in
        { default = app; darwin-vz-nix = app; });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.darwin-vz-nix ];
          packages = [ pkgs.rust-analyzer pkgs.clippy pkgs.rustfmt pkgs.nixpkgs-fmt pkgs.deadnix ]
            ++ lib.optionals pkgs.stdenv.hostPlatform.isLinux [ pkgs.qemu pkgs.virtiofsd ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);

      checks = forAllSystems (pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
        in
        {
          package = self.packages.${system}.darwin-vz-nix;
          nix-lint = pkgs.runCommand "darwin-vz-nix-nix-lint"
            { nativeBuildInputs = [ pkgs.nixpkgs-fmt pkgs.deadnix ]; } ''
            cd ${lib.fileset.toSource { root = ./.; fileset = lib.fileset.fileFilter (f: f.hasExt "nix") ./.; }}
            nixpkgs-fmt --check $(find . -name '*.nix')
            deadnix --fail --no-underscore .
            touch $out
          '';
        } // lib.optionalAttrs (system == "aarch64-linux") {
          guest-system = self.packages.aarch64-linux.guest-system;
        });
    };
}
