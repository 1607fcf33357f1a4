"""What a plugin adding CLI commands (``qpipe_add_commands``) may use, public API.

A command that loads a pipeline, resolves it against the installed plugins, loads its model
and data, and prints a results table, the way qpipe's own commands do:

    from qpipe.commands import ErrorGuard, Registry, get_plugin_manager, load_config, resolve

    with ErrorGuard():                     # QpipeError -> one red line and exit 2
        pm = get_plugin_manager()
        resolved = resolve(load_config(path), Registry.from_plugins(pm))
        inputs = load_inputs(pm, resolved)  # .model, .evaluation, .calibration, .training, ...

These are re-exported from private modules; import them from here only.
"""

from __future__ import annotations

from qpipe.cli import ErrorGuard
from qpipe.config import load_config, resolve
from qpipe.display import summary_table
from qpipe.outputs import new_timestamp
from qpipe.inputs import load_inputs
from qpipe.plugins import get_plugin_manager
from qpipe.registry import Registry

__all__ = ["ErrorGuard", "load_config", "resolve", "summary_table", "new_timestamp", "load_inputs",
           "get_plugin_manager", "Registry"]
