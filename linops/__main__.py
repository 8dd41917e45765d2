"""``python3 -m linops``: the command line of :mod:`linops.cli`."""

from linops.cli import main

main()
