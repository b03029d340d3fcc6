# Builds that must fail, under Nix and under ocibuild.
{ nonce }:
let
  lib = import ./lib.nix { inherit nonce; };
  fail_exit = lib.mk { name = "fail-exit"; script = "echo failing on purpose >&2; exit 3"; };
in
{
  inherit fail_exit;
  fail_no_output = lib.mk { name = "fail-no-output"; script = "echo 'built nothing'"; };
  fail_dependent = lib.mk { name = "fail-dependent"; script = "cat ${fail_exit} > $out"; };
  # Outputs referring to each other in a cycle: Nix refuses it.
  fail_output_cycle = lib.mk {
    name = "fail-output-cycle";
    outputs = [ "out" "dev" ];
    script = "echo $dev > $out; echo $out > $dev";
  };
  # Independent of the failures: must still build.
  survivor = lib.mk { name = "survivor"; script = "echo survived > $out"; };
}
