"""``python -m phaselens``: the same as the ``phaselens`` console script."""

from phaselens.cli import main

main()
