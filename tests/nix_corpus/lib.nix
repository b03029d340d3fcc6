# Shared by the corpus: a static busybox from the store as the only tool.
#
# `bbdir/busybox` is a copy of /bin/busybox the test (or the demo) puts next to
# this file; it is not in git. `nonce` goes into every name so that each test
# session builds new store paths (nix-build really builds them).
{ nonce }:
rec {
  bbd = builtins.path { path = ./bbdir; name = "busybox"; };
  bb = "${bbd}/busybox";

  # A derivation whose builder is `busybox sh -c SCRIPT`, with PATH set to a
  # directory of busybox applets (made by `tools`, an input derivation).
  mk = { name, script, usesTools ? true, ... }@attrs:
    derivation ((builtins.removeAttrs attrs [ "script" "usesTools" ]) // {
      name = "${name}-${nonce}";
      system = builtins.currentSystem;
      builder = bb;
      args = [ "sh" "-c" ((if usesTools then "export PATH=${tools}/bin; " else "") + script) ];
    });

  tools = derivation {
    name = "tools-${nonce}";
    system = builtins.currentSystem;
    builder = bb;
    args = [ "sh" "-c" ''
      ${bb} mkdir -p $out/bin
      for a in sh mkdir echo cat cp ln chmod head yes printf seq wc tr rm test; do
        ${bb} ln -s ${bb} $out/bin/$a
      done
    '' ];
  };
}
