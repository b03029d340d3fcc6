# A chain: direct references, references only through copied content, none.
{ nonce }:
let
  lib = import ./lib.nix { inherit nonce; };
  base = lib.mk { name = "chain-base"; script = "mkdir $out; echo payload > $out/payload; echo $out > $out/me"; };
  direct = lib.mk { name = "chain-direct"; script = "echo 'base is ${base}' > $out"; };
  # Copies direct's text, which names base: refers to base, never to direct.
  copied = lib.mk { name = "chain-copied"; script = "cat ${direct} > $out"; };
  # Reads base, writes nothing that names a store path.
  none = lib.mk { name = "chain-none"; script = "wc -c < ${base}/payload > $out"; };
  # Three levels: uses copied, which uses direct, which uses base.
  top = lib.mk { name = "chain-top"; script = "mkdir $out; cat ${copied} ${none} > $out/all; ln -s ${none} $out/none"; };
in
{ inherit base direct copied none top; tools = lib.tools; }
