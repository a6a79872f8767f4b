# The case runner both eval test files share: tests/nix/run asks for `names`, then for `report i` one case at a
# time, so that an evaluation error (which tryEval cannot always catch) fails only that case.
cases:
let
  plain = builtins.unsafeDiscardStringContext;
in
{
  names = map (c: c.name) cases;
  report = i:
    let
      c = builtins.elemAt cases i;
      r = builtins.tryEval (builtins.deepSeq c.got c.got);
      show = v: plain (builtins.toJSON v);
    in
    if r.success && r.value == c.expected then "ok"
    else if r.success then "got ${show r.value}, expected ${show c.expected}"
    else "evaluation error, expected ${show c.expected}";
}
