# passAsFile: the values arrive as files under /build, `<name>Path` names them.
{ nonce }:
let lib = import ./lib.nix { inherit nonce; }; in
{
  passasfile = lib.mk {
    name = "passasfile";
    passAsFile = [ "text" "empty" ];
    text = "line one\nline two with \"quotes\" and $dollars\n";
    empty = "";
    plain = "not passed as a file";
    script = ''
      mkdir $out
      cat $textPath > $out/text
      cat $emptyPath > $out/empty
      echo "$textPath $emptyPath $plain text=''${text-unset}" > $out/vars
    '';
  };
}
