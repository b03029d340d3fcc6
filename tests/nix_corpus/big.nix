# A large output (32 MiB) and many small files (2000 in 20 directories).
{ nonce }:
let lib = import ./lib.nix { inherit nonce; }; in
{
  large = lib.mk { name = "large"; script = ''yes "a line of a large output, in $out" | head -c 33554432 > $out''; };
  many = lib.mk {
    name = "many";
    script = ''
      mkdir $out
      for d in $(seq 0 19); do mkdir $out/d$d; done
      for i in $(seq 0 1999); do echo "file $i" > $out/d$((i % 20))/f$i; done
    '';
  };
}
