"""Build the plugin manager: built-ins and third-party plugins load through one path.

Every plugin, built-in or not, is an entry point in the group ``qpipe``. A plugin that
fails to import is recorded in ``load_failures`` (shown by ``qpipe plugins``) while the
others keep working. ``QPIPE_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name;
``QPIPE_TRACE=1`` prints every hook call.

Every hook is called through pluggy (``pm.hook.<name>(...)``), so hookwrappers, default
arguments and tracing work for all of them. Register, lifecycle and artifact-check hooks are *isolated*:
when a plugin registers, each of its implementations of those hooks is wrapped so that an
exception is returned as a ``HookFailure`` naming the plugin instead of propagating, and
the other plugins' implementations still run. The caller (``qpipe.lifecycle.Lifecycle``,
``qpipe.registry.Registry.from_plugins``) decides what a failure means.
"""

from __future__ import annotations

import contextvars
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from qpipe import hookspecs
from qpipe.errors import PluginError, short_error

ENTRY_POINT_GROUP = "qpipe"
#: hooks whose implementations are isolated per plugin (see the module docstring)
ISOLATED_PREFIXES = ("qpipe_register_", "qpipe_pipeline_", "qpipe_variant_", "qpipe_check_")

_calling: contextvars.ContextVar[str | None] = contextvars.ContextVar("qpipe_calling_plugin", default=None)


@dataclass
class HookFailure:
    """What an isolated hook implementation returns instead of raising."""

    plugin: str
    hook: str
    error: Exception


def calling_plugin() -> str | None:
    """The name of the plugin whose isolated hook implementation is running (else None)."""
    return _calling.get()


def _isolate(function: Callable[..., Any], plugin: str, hook: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def isolated(*args: Any, **kwargs: Any) -> Any:
        token = _calling.set(plugin)
        try:
            return function(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  # reported by the caller, naming the plugin
            return HookFailure(plugin, hook, exc)
        finally:
            _calling.reset(token)

    return isolated


@dataclass
class PluginInfo:
    """One loaded plugin: its entry-point name, distribution and version."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None


class QpipePluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers where each plugin came from and what failed."""

    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP)
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.load_failures: dict[str, str] = {}
        #: entry-point names skipped because ``QPIPE_DISABLE_PLUGINS`` lists them
        self.disabled: set[str] = set()

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        """Register like pluggy, then isolate the plugin's register and lifecycle hooks."""
        registered = super().register(plugin, name=name)
        if registered is None:
            return None
        for caller in self.get_hookcallers(plugin) or []:
            if not caller.name.startswith(ISOLATED_PREFIXES):
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    # setattr: HookImpl.function is Final for type checkers; pluggy reads it at call time
                    setattr(impl, "function", _isolate(impl.function, registered, caller.name))  # noqa: B010
        return registered

    def register_plugin(self, plugin: Any, name: str, info: PluginInfo | None = None) -> None:
        """Register ``plugin`` under ``name`` and check that all its hooks exist."""
        self.register(plugin, name=name)
        self.infos[name] = info or PluginInfo(name=name, module=getattr(plugin, "__name__", None))
        try:
            self.check_pending()
        except pluggy.PluginValidationError as exc:
            self.unregister(name=name)
            self.infos.pop(name, None)
            raise PluginError(f"plugin '{name}': {exc}") from exc

    def load_entry_points(self, disabled: set[str] | None = None) -> None:
        """Import and register every ``qpipe`` entry point not in ``disabled``."""
        disabled = disabled if disabled is not None else disabled_plugins()
        seen: set[str] = set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in disabled:
                self.disabled.add(ep.name)
                continue
            if ep.name in seen or self.has_plugin(ep.name):
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist else None,
                version=dist.version if dist else None,
                module=ep.value,
            )
            try:
                plugin = ep.load()
                self.register_plugin(plugin, ep.name, info)
            except Exception as exc:  # a broken plugin must not take the others down
                self.load_failures[ep.name] = short_error(exc)


def disabled_plugins() -> set[str]:
    """Plugin names listed in ``QPIPE_DISABLE_PLUGINS`` (comma-separated)."""
    raw = os.environ.get("QPIPE_DISABLE_PLUGINS", "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def get_plugin_manager(load_entry_points: bool = True) -> QpipePluginManager:
    """A fresh plugin manager with the hook specs and (by default) all installed plugins."""
    pm = QpipePluginManager()
    if load_entry_points:
        pm.load_entry_points()
    if os.environ.get("QPIPE_TRACE"):
        pm.trace.root.setwriter(lambda text: sys.stderr.write(text))
        pm.enable_tracing()
    return pm
