# One output; several outputs referencing themselves and each other.
{ nonce }:
let lib = import ./lib.nix { inherit nonce; }; in
{
  single = lib.mk { name = "single"; script = "echo just one output > $out"; };

  multi = lib.mk {
    name = "multi";
    outputs = [ "out" "dev" "doc" ];
    script = ''
      mkdir -p $out/share $dev/include
      echo "self: $out" > $out/share/self              # out -> out
      echo "dev is at $dev" > $out/share/dev-ref       # out -> dev
      echo "#define DEV \"$dev\"" > $dev/include/x.h   # dev -> dev
      echo "plain documentation" > $doc                # doc -> nothing
    '';
  };
}
