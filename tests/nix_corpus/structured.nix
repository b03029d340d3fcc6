# Structured attributes (.attrs.json, .attrs.sh), output placeholders and
# exportReferencesGraph, each as Nix 2.8 hands them to the builder. The
# builders copy what they were given into their outputs, so equal NAR hashes
# mean equal bytes.
{ nonce }:
let
  lib = import ./lib.nix { inherit nonce; };
  dep0 = lib.mk { name = "sa-dep0"; usesTools = false; script = "${lib.bb} echo dep0 > $out"; };
  dep1 = lib.mk { name = "sa-dep1"; usesTools = false; script = "${lib.bb} echo ${dep0} > $out"; };
  # With structured attributes $out is not in the environment: the builder
  # writes to its placeholder, which Nix rewrites in the arguments.
  sa = { name, script, usesTools ? true, ... }@attrs:
    derivation ((builtins.removeAttrs attrs [ "script" "usesTools" ]) // {
      name = "${name}-${nonce}";
      system = builtins.currentSystem;
      builder = lib.bb;
      __structuredAttrs = true;
      args = [ "sh" "-c" ((if usesTools then "export PATH=${lib.tools}/bin; " else "") + script) ];
    });
  out = builtins.placeholder "out";
  # The output checks' derivations refer to dep1 (so, through it, to dep0) only.
  refersToDep1 = "${lib.bb} echo ${dep1} > ${out}";
  copyAttrs = ''
    o=${builtins.placeholder "out"}
    mkdir $o
    cp /build/.attrs.json /build/.attrs.sh $o/
    ${lib.bb} env | ${lib.bb} sort | ${lib.bb} grep -v '^SHLVL=' > $o/env
    ls /build > $o/build-dir
  '';
in
{
  inherit dep0 dep1;
  # Every kind of value .attrs.sh holds or leaves out, with Nix 2.8's quirks.
  structured = sa {
    name = "sa-structured";
    outputs = [ "out" "dev" ];
    script = copyAttrs + "echo dev > ${builtins.placeholder "dev"}";
    str = "it's \"quoted\"\n\ttabbed ünï $HOME \\";
    ctl = builtins.fromJSON "\"a\\u0001b\\u001fc\\u007fd\\b\\f/\"";
    int = 42; neg = -7; big = 3000000000; t = true; f = false; n = null;
    floats = [ 1.0e15 0.1 1.0e-7 123456789.123 1.0e16 100.0 ];
    half = 0.5; whole = 2.0; huge = 1.0e10;
    list = [ 1 "a" true null ]; nested = [ [ 1 ] ]; empty = [ ];
    obj = { a = 1; "b c" = "x"; }; objn = { a = { b = 1; }; };
    "bad-name" = 1; _under = "y";
    self = builtins.placeholder "out";
    passAsFile = [ "str" ];  # ignored with structured attributes
    dep = dep1;
  };
  structured_checks = sa {
    name = "sa-checks"; usesTools = false;
    script = refersToDep1;
    outputChecks.out = {
      allowedReferences = [ dep1 ];
      allowedRequisites = [ "out" dep1 dep0 ];
      disallowedReferences = [ dep0 ];
      maxSize = 100000;
      maxClosureSize = 100000;
    };
  };
  # Unlike the top-level attribute, the output itself counts among its requisites.
  fail_structured_requisites = sa {
    name = "sa-fail-reqs"; usesTools = false;
    script = refersToDep1;
    outputChecks.out.allowedRequisites = [ dep1 dep0 ];
  };
  fail_structured_max_size = sa {
    name = "sa-fail-size"; usesTools = false;
    script = "${lib.bb} seq 1 2000 > ${out}";
    outputChecks.out.maxSize = 1000;
  };
  fail_structured_closure_size = sa {
    name = "sa-fail-closure"; usesTools = false;
    script = "${lib.bb} echo ${lib.bb} > ${out}";  # the busybox alone is 2 MB
    outputChecks.out.maxClosureSize = 1000;
  };
  # Without structured attributes: placeholders in the arguments, the
  # environment and a passAsFile file.
  placeholders = lib.mk {
    name = "sa-placeholders";
    here = builtins.placeholder "out";
    text = "my output is ${builtins.placeholder "out"}\n";
    passAsFile = [ "text" ];
    script = ''
      mkdir $out
      echo "${builtins.placeholder "out"} $here" > $out/seen
      cat $textPath > $out/text
    '';
  };
  # The references graph of an input (and of a source), as files in /build.
  export_graph = lib.mk {
    name = "sa-export-graph";
    exportReferencesGraph = [ "graph" dep1 "tools.graph" lib.tools ];
    script = ''
      mkdir $out
      cp /build/graph /build/tools.graph $out/
      ls /build > $out/build-dir
    '';
  };
}
