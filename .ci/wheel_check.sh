#!/usr/bin/env bash
# Install the built wheel (not the checkout) into a fresh environment outside the checkout,
# and use it there as a user would: `treeguard demo` (its own checks of a real freeze), every
# public name, the version and the LICENSE in the installed metadata.
#   bash .ci/wheel_check.sh DIST_DIR
set -euo pipefail
checkout=$(cd "$(dirname "$0")/.." && pwd -P)
wheels=("$1"/treeguard-*.whl)
[ "${#wheels[@]}" -eq 1 ] && [ -f "${wheels[0]}" ] || { echo "want one wheel in $1" >&2; exit 1; }
wheel=$(cd "$(dirname "${wheels[0]}")" && pwd -P)/$(basename "${wheels[0]}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$wheel"
cd "$work"  # nothing of the checkout is importable from here
"$work/venv/bin/treeguard" demo  # exits non-zero if any of its checks failed (set -e)
"$work/venv/bin/python" - "$checkout" <<'PY'
import sys
from importlib import metadata
from pathlib import Path

import treeguard

checkout = Path(sys.argv[1])
where = Path(treeguard.__file__).resolve()
assert checkout not in where.parents, f"imported from the checkout: {where}"
names = {}
exec("from treeguard import *", names)
missing = [name for name in treeguard.__all__ if name not in names]
assert not missing, missing
dist = metadata.distribution("treeguard")
assert dist.version == treeguard.__version__, (dist.version, treeguard.__version__)
assert dist.metadata["License-Expression"] == "MIT"
licenses = [f for f in dist.files or () if f.name == "LICENSE" and ".dist-info" in str(f)]
assert licenses and licenses[0].read_text().startswith("MIT License"), "no LICENSE"
print(f"wheel: treeguard {dist.version} from {where.parent}: {len(treeguard.__all__)} names, LICENSE")
PY
[ "$("$work/venv/bin/treeguard" --version)" = "treeguard $("$work/venv/bin/python" -c 'import treeguard; print(treeguard.__version__)')" ]
