{ nonce }:
let
  bbd = builtins.path { path = ./bbdir; name = "busybox"; };
  zig = builtins.path { path = ./zig; name = "zig-0.13.0"; };
  src = builtins.path { path = ./src; name = "brotli-1.1.0-src"; };
  common = {
    inherit nonce;
    system = builtins.currentSystem;
    builder = "${bbd}/busybox";
    ZIG = "${zig}/zig";
    TARGET = "x86_64-linux-gnu.2.17";
  };
  lib = derivation (common // {
    name = "libbrotli-1.1.0";
    args = [ "sh" "-e" "-c" ''
      B=${bbd}/busybox
      export ZIG_GLOBAL_CACHE_DIR=$TMPDIR/zig-cache ZIG_LOCAL_CACHE_DIR=$TMPDIR/zig-cache
      $B mkdir -p $out/lib $out/include objs
      for f in $($B find ${src}/c/common ${src}/c/dec ${src}/c/enc -name '*.c' | $B sort); do
        d=$($B basename $($B dirname $f))
        $ZIG cc -target $TARGET -O2 -I${src}/c/include -c $f -o objs/$d-$($B basename $f .c).o
      done
      $ZIG ar rcsD $out/lib/libbrotli.a $($B ls objs/*.o | $B sort)
      $B cp -r ${src}/c/include/brotli $out/include/
    '' ];
  });
  cli = derivation (common // {
    name = "brotli-1.1.0";
    args = [ "sh" "-e" "-c" ''
      B=${bbd}/busybox
      export ZIG_GLOBAL_CACHE_DIR=$TMPDIR/zig-cache ZIG_LOCAL_CACHE_DIR=$TMPDIR/zig-cache
      $B mkdir -p $out/bin
      $ZIG cc -target $TARGET -O2 -I${lib}/include ${src}/c/tools/brotli.c ${lib}/lib/libbrotli.a -lm -o $out/bin/brotli
    '' ];
  });
in { inherit lib cli; }
