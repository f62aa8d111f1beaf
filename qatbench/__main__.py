"""``python -m qatbench``: the same command line as the ``qatbench`` script."""

from qatbench.cli import main

if __name__ == "__main__":  # worker processes import the main module again: no second run
    main()
