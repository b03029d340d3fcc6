# Fixed-output derivations: flat and recursive sha256, and a wrong hash.
# `rhash` is the NAR hash of the recursive one's expected tree, computed by the
# test with nix-hash (Nix itself is the oracle).
{ nonce, rhash }:
let
  lib = import ./lib.nix { inherit nonce; };
  text = "fixed content ${nonce}\n";
in
{
  flat = lib.mk {
    name = "fixed-flat";
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" text;
    script = "printf '%s' '${text}' > $out";
  };
  recursive = lib.mk {
    name = "fixed-recursive";
    outputHashMode = "recursive"; outputHashAlgo = "sha256";
    outputHash = rhash;
    script = "mkdir $out; printf '%s' '${text}' > $out/file; printf '#!/bin/sh\\n' > $out/exe; chmod +x $out/exe";
  };
  fail_wrong_hash = lib.mk {
    name = "fixed-wrong";
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "something else";
    script = "printf '%s' '${text}' > $out";
  };
}
