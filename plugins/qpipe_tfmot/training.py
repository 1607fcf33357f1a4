"""Moved to the public toolkit ``qpipe.keras.training``; kept so older imports still work."""

from qpipe.keras.training import *
