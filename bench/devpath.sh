#!/usr/bin/env bash
# Makes the checkout importable as the installed `phaselens` package (DESIGN.md "Layout": phaselens.agent
# lives in agent/, ...) without `pip install`, for the GPU machine, where nothing can be installed. Use:
#   eval "$(bash bench/devpath.sh)"; python3 -m phaselens --help; python3 -m pytest -q tests/...
# It writes .devpath/sitecustomize.py, a meta-path finder mapping phaselens.<sub> to <root>/<sub>, as
# setuptools' editable install does; so it works whatever sits first on sys.path (pytest puts the checkout
# there, whose phaselens/ folder alone lacks the subpackages).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$root/.devpath"
mkdir -p "$root/.devpath"
cat > "$root/.devpath/sitecustomize.py" <<PY
import importlib.machinery
import sys

_ROOT = "$root"
_SUBPACKAGES = ("engine", "serving_shim", "kernels", "agent", "exporters", "dashboards", "advisor")


class _PhaselensDevFinder:
    @staticmethod
    def find_spec(fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) == 2 and parts[0] == "phaselens" and parts[1] in _SUBPACKAGES:
            return importlib.machinery.PathFinder.find_spec(fullname, [_ROOT])
        return None


sys.meta_path.insert(0, _PhaselensDevFinder())
PY
echo "export PYTHONPATH=$root/.devpath:$root\${PYTHONPATH:+:\$PYTHONPATH}"
