# Symlinks (relative, absolute into the store, absolute elsewhere, dangling),
# executable files, an output that is itself a symlink.
{ nonce }:
let lib = import ./lib.nix { inherit nonce; }; in
{
  links = lib.mk {
    name = "links";
    script = ''
      mkdir -p $out/bin $out/lib
      printf '#!/bin/sh\necho hi\n' > $out/bin/tool
      chmod 755 $out/bin/tool
      echo data > $out/lib/data
      chmod 444 $out/lib/data
      ln -s ../lib/data $out/bin/relative
      ln -s ${lib.bb} $out/bin/absolute-store
      ln -s /etc/passwd $out/bin/absolute-host
      ln -s does/not/exist $out/bin/dangling
      ln -s $out/lib $out/self-link
    '';
  };
  linkout = lib.mk { name = "linkout"; script = "ln -s ${lib.bb} $out"; };
  exeout = lib.mk { name = "exeout"; script = "printf '#!/bin/sh\\nexit 0\\n' > $out; chmod +x $out"; };
}
