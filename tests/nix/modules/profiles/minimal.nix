# Stands in for nixpkgs' nixos/modules/profiles/minimal.nix, which nix/guest/default.nix imports through
# modulesPath: that profile only sets nixpkgs' own options (documentation, fonts, xdg, ...), none of ours,
# so tests/nix/guest-eval.nix evaluates the guest module without it.
{ }
