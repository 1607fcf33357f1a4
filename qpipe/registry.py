"""Named components gathered from the ``qpipe_register_*`` hooks, looked up by name."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from qpipe.components import KINDS, Component
from qpipe.errors import PluginError, QpipeError, short_error
from qpipe.plugins import HookFailure, QpipePluginManager, calling_plugin


#: the method each kind of component must implement (checked when it is registered)
REQUIRED_METHOD = {"quantizer": "quantize", "calibrator": "calibrate", "backend": "load", "evaluator": "evaluate"}


@dataclass(frozen=True)
class Registered:
    """A registered component class and the plugin that registered it."""

    cls: type[Component]
    plugin: str


class Registry:
    """All components by kind and name; built once per plugin manager."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        #: plugins that could have provided a name but did not load: name -> why
        self.unavailable: dict[str, str] = {}
        #: plugins whose registration failed (raised, or registered a non-component): name -> why
        self.failures: dict[str, str] = {}
        #: (kind, name) registered by more than one plugin -> those plugins
        self.contested: dict[tuple[str, str], list[str]] = {}

    @classmethod
    def from_plugins(cls, pm: QpipePluginManager) -> "Registry":
        """Call every plugin's register hooks, attributing each component to its plugin.

        A plugin whose register hook raises, or that registers something that is not a
        component, is recorded in ``failures`` and contributes nothing; a name two plugins
        register is ``contested``: using it is an error naming both, everything else works.
        """
        registry = cls()
        registry.unavailable = {name: f"failed to load: {why}" for name, why in pm.load_failures.items()}
        registry.unavailable.update({name: "is disabled by QPIPE_DISABLE_PLUGINS"
                                     for name in sorted(getattr(pm, "disabled", ()))})
        for kind in KINDS:  # through pluggy; each implementation is isolated (qpipe.plugins)
            outcome = getattr(pm.hook, f"qpipe_register_{kind}s")(register=registry._registrar(kind))
            for failure in outcome or []:
                if isinstance(failure, HookFailure) and failure.plugin not in registry.failures:
                    registry._fail(failure.plugin, str(failure.error) if isinstance(failure.error, PluginError) else
                                   f"plugin '{failure.plugin}' raised in {failure.hook}: {short_error(failure.error)}")
        order = {name: i for i, (name, _) in enumerate(pm.list_name_plugin())}  # pluggy calls the last first
        for plugins in registry.contested.values():
            plugins.sort(key=lambda name: order.get(name, len(order)))
        return registry

    def _fail(self, plugin: str, why: str) -> None:
        """Drop everything ``plugin`` registered and remember why."""
        self.failures[plugin] = why
        self.unavailable[plugin] = f"failed to register: {why}"
        for entries in self.entries.values():
            for name in [n for n, e in entries.items() if e.plugin == plugin]:
                del entries[name]

    def _registrar(self, kind: str):
        base = KINDS[kind]

        def register(component: type[Component]) -> None:
            plugin = calling_plugin() or "unknown"
            if plugin in self.failures:
                return
            if not (isinstance(component, type) and issubclass(component, base)):
                raise PluginError(
                    f"plugin '{plugin}' registered {component!r} as a {kind}; "
                    f"expected a subclass of qpipe.{base.__name__}"
                )
            if not component.name:
                raise PluginError(f"plugin '{plugin}': {component.__name__} has no 'name'")
            method = REQUIRED_METHOD[kind]
            if getattr(component, method) is getattr(base, method):
                raise PluginError(f"plugin '{plugin}': {kind} '{component.name}' ({component.__name__}) does not "
                                  f"implement {method}(); every {kind} must")
            if (kind, component.name) in self.contested:
                self.contested[(kind, component.name)].append(plugin)
                return
            existing = self.entries[kind].get(component.name)
            if existing is not None and existing.cls is not component:
                self.contested[(kind, component.name)] = [existing.plugin, plugin]
                del self.entries[kind][component.name]
                return
            self.entries[kind][component.name] = Registered(component, plugin)

        return register

    def names(self, kind: str) -> list[str]:
        """Sorted names of the registered components of ``kind``."""
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Registered:
        """The entry for ``name``, or a QpipeError listing the valid names."""
        try:
            return self.entries[kind][name]
        except KeyError:
            pass
        if (kind, name) in self.contested:
            plugins = self.contested[(kind, name)]
            raise PluginError(
                f"{kind} '{name}' is registered twice: by plugin '{plugins[0]}' and by plugin "
                f"'{plugins[1]}'; disable one with QPIPE_DISABLE_PLUGINS={plugins[1]}"
            )
        notes = "".join(f"; note: plugin '{plugin}' {why}" for plugin, why in self.unavailable.items())
        raise QpipeError(unknown_name_message(kind, name, self.names(kind)) + notes) from None

    def default_backend(self, fmt: str) -> str:
        """The backend that declares itself the default for artifacts of ``fmt`` (``default_for``)."""
        claimed = sorted(name for name, e in self.entries["backend"].items()
                         if fmt in getattr(e.cls, "default_for", ()))
        if len(claimed) == 1:
            return claimed[0]
        if not claimed:
            raise QpipeError(f"no installed backend runs {fmt} artifacts by default; name one with 'backend:' "
                             f"(backends: {', '.join(self.names('backend')) or 'none registered'})")
        raise QpipeError(f"backends {', '.join(claimed)} each claim to be the default for {fmt} artifacts; "
                         "name one with 'backend:'")

    def default_evaluators(self) -> list[str]:
        """The evaluators that run when a pipeline lists none, in their declared order."""
        chosen = [(order, name) for name, e in self.entries["evaluator"].items()
                  if (order := getattr(e.cls, "default_order", None)) is not None]
        return [name for _, name in sorted(chosen)]

    def makes_reference(self, quantizer: str) -> bool:
        """Whether ``quantizer`` makes the unquantized reference (the default baseline)."""
        entry = self.entries["quantizer"].get(quantizer)
        return bool(entry is not None and getattr(entry.cls, "reference", False))

    def problems(self) -> dict[str, str]:
        """Registration failures and contested names, for ``qpipe plugins``: label -> why."""
        found = dict(self.failures)
        for (kind, name), plugins in self.contested.items():
            found[f"{kind} '{name}'"] = (f"registered by plugins {', '.join(repr(p) for p in plugins)}; "
                                         f"pipelines using it fail until one is disabled")
        return found


def unknown_name_message(what: str, name: str, valid: list[str]) -> str:
    """"unknown quantizer 'x' (did you mean 'y'?); valid: a, b"."""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    listing = ", ".join(valid) if valid else "none registered"
    return f"unknown {what} '{name}'{hint}; valid: {listing}"
