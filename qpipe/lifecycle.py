"""The one place lifecycle hooks are fired from.

Every ``qpipe_pipeline_*`` and ``qpipe_variant_*`` call of a run goes through a ``Lifecycle``:
the run's own hooks, the calls a variant makes while it runs in this process, the calls a
worker recorded (``EventLog``) and the parent replays, a variant restored from the cache, and
``qpipe log`` replaying a finished folder. Calls go through pluggy (hookwrappers, tracing with
``QPIPE_TRACE=1``); each plugin's implementation is isolated (``qpipe.plugins``).
"""

from __future__ import annotations

from typing import Any, Callable

from qpipe.errors import PluginError, QpipeError, short_error
from qpipe.plugins import HookFailure, QpipePluginManager
from qpipe.results import PipelineRun
from qpipe.signals import held_signals

#: a variant's calls while it runs: ``emit(hook, **kwargs)`` (the ``run`` argument is added by the receiver)
Emit = Callable[..., None]

#: hooks whose failure stops the run (the others are reported as warnings)
STRICT = ("qpipe_pipeline_started", "qpipe_variant_started")


def call_lifecycle(pm: QpipePluginManager, hook: str, strict: bool = False, **kwargs: Any) -> list[str]:
    """Call a lifecycle hook through pluggy; every plugin's implementation runs.

    One that raises is reported naming its plugin and the others still run. Afterwards, with
    ``strict`` the first error is raised (a plugin's own QpipeError as it is, anything else as
    a PluginError); otherwise errors are returned as one-line messages. SIGINT/SIGTERM arriving
    meanwhile are held until the hook returns (``qpipe.signals``).
    """
    caller = getattr(pm.hook, hook)
    with held_signals():
        try:
            outcome = caller(**kwargs)
        except QpipeError:
            raise
        except Exception as exc:  # only a hookwrapper's own error gets here
            wrappers = [i.plugin_name for i in caller.get_hookimpls() if i.wrapper or i.hookwrapper]
            raise PluginError(f"a hookwrapper of {hook} (plugin {', '.join(map(repr, wrappers))}) "
                              f"failed: {short_error(exc)}") from exc
    failures = [item for item in outcome or [] if isinstance(item, HookFailure)]
    if strict and failures:
        first = failures[0]
        if isinstance(first.error, QpipeError):
            raise first.error
        raise PluginError(failure_message(first)) from first.error
    return [failure_message(failure) for failure in failures]


def failure_message(failure: HookFailure) -> str:
    """One line naming the plugin and hook that failed."""
    if isinstance(failure.error, QpipeError):
        return f"plugin '{failure.plugin}' ({failure.hook}): {short_error(failure.error)}"
    return f"plugin '{failure.plugin}' failed in {failure.hook}: {short_error(failure.error)}"


class Lifecycle:
    """Fires the lifecycle hooks of one run; problems of non-strict hooks land in ``warnings``."""

    def __init__(self, pm: QpipePluginManager, run: PipelineRun, warnings: list[str] | None = None):
        self.pm = pm
        self.run = run
        self.warnings = warnings if warnings is not None else []

    def fire(self, hook: str, **kwargs: Any) -> None:
        """Call ``hook`` with this run; ``STRICT`` hooks raise, the others add warnings."""
        self.warnings += call_lifecycle(self.pm, hook, strict=hook in STRICT, run=self.run, **kwargs)

    def replay(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Fire the calls a variant made elsewhere (an ``EventLog``), in order."""
        for hook, kwargs in events:
            self.fire(hook, **kwargs)


class EventLog:
    """Records a variant's calls (``emit``) where no hook may run: a worker process or Ray task."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, hook: str, **kwargs: Any) -> None:
        self.events.append((hook, kwargs))

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        """The calls recorded since the last ``take``."""
        events, self.events = self.events, []
        return events
