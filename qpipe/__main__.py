"""``python -m qpipe``: the same command line as the ``qpipe`` script."""

from qpipe.cli import entry

entry()
