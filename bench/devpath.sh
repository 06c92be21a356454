#!/usr/bin/env bash
# Builds .devpath/phaselens: the installed package layout (DESIGN.md "Layout") made of symlinks, for machines
# where we run from the tree without `pip install` (the GPU machine). Use:
#   eval "$(bash bench/devpath.sh)"; python3 -m phaselens --help
# pytest must not put the checkout's own phaselens/ folder (which lacks the mapped subpackages) first on
# sys.path: run it as `python3 -P -m pytest --import-mode=importlib -p no:cacheprovider tests/...`.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
dest=$root/.devpath/phaselens
rm -rf "$root/.devpath"
mkdir -p "$dest"
for f in "$root"/phaselens/*; do ln -s "$f" "$dest/$(basename "$f")"; done
for d in engine serving_shim kernels agent exporters dashboards advisor; do ln -s "$root/$d" "$dest/$d"; done
echo "export PYTHONPATH=$root/.devpath\${PYTHONPATH:+:\$PYTHONPATH}"
