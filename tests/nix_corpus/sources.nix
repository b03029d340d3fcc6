# Input sources: builtins.path (a directory, a single file) and builtins.toFile
# (one with a reference to another source).
{ nonce }:
let
  lib = import ./lib.nix { inherit nonce; };
  srcdir = builtins.path { path = ./srcdir; name = "srcdir"; };
  single = builtins.path { path = ./srcdir/hello.txt; name = "hello.txt"; };
  plain = builtins.toFile "plain-${nonce}.txt" "a file made by builtins.toFile\n";
  withref = builtins.toFile "withref-${nonce}.txt" "the sources are in ${srcdir}\n";
in
{
  copy = lib.mk {
    name = "sources-copy";
    script = ''
      mkdir $out
      cp -r ${srcdir} $out/src
      cp ${single} $out/single
      cat ${plain} ${withref} > $out/texts
    '';
  };
  # Only the source's own bytes, no store path: no references.
  content = lib.mk { name = "sources-content"; script = "cat ${srcdir}/hello.txt ${plain} > $out"; };
}
