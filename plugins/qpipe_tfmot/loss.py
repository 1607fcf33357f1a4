"""Moved to the public toolkit ``qpipe.keras.loss``; kept so older imports still work."""

from qpipe.keras.loss import *
