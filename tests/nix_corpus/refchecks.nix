# Output checks (allowedReferences and the like), enforced as Nix 2.8 does.
{ nonce }:
let
  lib = import ./lib.nix { inherit nonce; };
  dep0 = lib.mk { name = "ref-dep0"; usesTools = false; script = "${lib.bb} echo dep0 > $out"; };
  dep1 = lib.mk { name = "ref-dep1"; usesTools = false; script = "${lib.bb} echo ${dep0} > $out"; };
  # Refers to dep1 (and, through it, dep0); never to the tools.
  user = attrs: lib.mk ({ name = "ref-user"; usesTools = false;
                          script = "${lib.bb} echo ${dep1} > $out"; } // attrs);
in
{
  inherit dep0 dep1;
  allowed_ok = user { name = "ref-allowed-ok"; allowedReferences = [ dep1 ]; };
  allowed_self = lib.mk { name = "ref-allowed-self"; usesTools = false;
                          allowedReferences = [ "out" ]; script = "${lib.bb} echo $out > $out"; };
  requisites_ok = user { name = "ref-requisites-ok"; allowedRequisites = [ dep0 dep1 ]; };
  disallowed_ok = user { name = "ref-disallowed-ok"; disallowedReferences = [ dep0 ]; };
  fail_allowed_refs = user { name = "ref-fail-allowed"; allowedReferences = [ ]; };
  fail_allowed_reqs = user { name = "ref-fail-allowed-reqs"; allowedRequisites = [ dep1 ]; };
  fail_disallowed_refs = user { name = "ref-fail-disallowed"; disallowedReferences = [ dep1 ]; };
  fail_disallowed_reqs = user { name = "ref-fail-disallowed-reqs"; disallowedRequisites = [ dep0 ]; };
}
