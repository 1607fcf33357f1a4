"""Moved to the public toolkit ``qpipe.keras.rebuild``; kept so older imports still work."""

from qpipe.keras.rebuild import *
