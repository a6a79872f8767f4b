# darwin-vz-nix (host CLI) and dvn-agent (guest agent), from this repository's Cargo.lock.
# On darwin the CLI is signed ad hoc with the Virtualization.framework entitlement after fixup
# (stripping would invalidate an earlier signature).
{ lib, stdenv, rustPlatform, darwin }:

let
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  inherit (cargoToml.package) version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions ([ ../Cargo.toml ../Cargo.lock ../src ]
      ++ lib.optional (builtins.pathExists ../macos) ../macos);
  };
  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = lib.optionals stdenv.hostPlatform.isDarwin [ darwin.sigtool ];

  # Unit tests only: the end-to-end tests boot VMs and cannot run in the build sandbox.
  cargoTestFlags = [ "--lib" "--bins" ];

  postFixup = lib.optionalString stdenv.hostPlatform.isDarwin ''
    codesign --force --sign - --entitlements ${../macos/entitlements.plist} $out/bin/darwin-vz-nix
  '';

  meta = {
    description = cargoToml.package.description;
    license = lib.licenses.mit;
    mainProgram = "darwin-vz-nix";
    platforms = [ "aarch64-darwin" "x86_64-linux" "aarch64-linux" ];
  };
}
