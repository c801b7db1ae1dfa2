"""Each parameter default is written once (issue 19): a parameter name has a literal default in at most one
function signature of ``bestie/``. Shared settings travel in the parameter groups of :mod:`bestie.params`,
whose dataclass fields hold the defaults; a signature that needs one refers to the class
(``beta: float = GroupingParams.beta``) or takes the group whole.

Literal defaults that say "nothing given" (None, True / False, 0, 1, -1, "") carry no tuned value and are
not counted. The allow-list below is short and each entry says why.
"""

from __future__ import annotations

import ast
import dataclasses
from collections import defaultdict
from pathlib import Path

from bestie.params import GroupingParams, PseudoLabelParams, RefineParams

PACKAGE = Path(__file__).resolve().parents[1] / "bestie"
NEUTRAL = (None, True, False, 0, 1, -1, "")

#: Names that several functions share for different things, or by a convention that holds no tuned value.
DIFFERENT_CONCEPTS = {
    "source": "each validator's name of the input it checks, for its error messages (a different string each)",
    "mode": "a file mode (io.atomic.atomic_write 'wb') and the WSSS seed mode (wsss.crf.seed_map 'raw')",
    "device": "'cpu' = run on the CPU unless a device is given, the convention of every torch-facing function",
    "what": "the noun an error message names (coco_json: 'mask', trainer.resume: 'settings'), a different one each",
    "alpha": "the opacity of report/figures' overlays, one value per drawing (instances 0.45, label maps 0.55); "
             "the PAM controller's default is models.pam.PAM_ALPHA",
}

def _literal_defaults() -> dict[str, list[tuple[str, int, object]]]:
    """``name -> [(module path relative to bestie/, line, value)]`` of the literal parameter defaults."""
    found: dict[str, list[tuple[str, int, object]]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                try:
                    value = ast.literal_eval(default)
                except ValueError:
                    continue  # a name, an attribute (GroupingParams.beta), a call: not a literal
                found[arg.arg].append((rel, default.lineno, value))
    return found


def _tuned(value: object) -> bool:
    return not any(type(value) is type(n) and value == n for n in NEUTRAL)


def test_no_literal_default_is_repeated():
    repeated = {name: locs for name, locs in _literal_defaults().items()
                if len([v for *_, v in locs if _tuned(v)]) > 1}
    new = {name: locs for name, locs in repeated.items() if name not in DIFFERENT_CONCEPTS}
    assert new == {}, f"defaults written in several signatures (put them in a parameter group): {sorted(new)}"
    stale = sorted(set(DIFFERENT_CONCEPTS) - set(repeated))
    assert stale == [], f"no longer repeated, remove from the allow-list: {stale}"


def test_parameter_group_fields_have_no_literal_default_in_any_signature():
    """min_area, center_threshold, sigma, ... come from the groups, never from a literal in a signature."""
    fields = {f.name for cls in (PseudoLabelParams, GroupingParams, RefineParams) for f in dataclasses.fields(cls)}
    defaults = _literal_defaults()
    hits = [(name, rel, line, value) for name in sorted(fields) for rel, line, value in defaults.get(name, [])]
    assert hits == []
