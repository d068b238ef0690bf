"""Register the toolkit's architectures with transformers' Auto classes as soon as those are in use.

`import toolkit` has to stay cheap: the GGUF exporter and most of the CLI need neither torch nor transformers'
modelling code, which take seconds to import, while registering a model class with `AutoModelForCausalLM`
needs both. So `import toolkit` calls `install()`, which registers at once when transformers' Auto classes are
already loaded, and otherwise waits for them: a finder on `sys.meta_path` marks every `transformers` module
imported from then on, and once `transformers.models.auto` has loaded and no transformers module is still
half-initialised (our modelling code imports several of them, so registering in the middle of, say,
`modeling_layers` importing the Auto classes would fail), the architectures are registered and the finder
removes itself. Code of ours that builds models calls `register_auto_classes()` directly as well.

Written here because the standard library offers post-import hooks only as this pattern (`wrapt`'s
`when_imported` fires inside the triggering import, which is the half-initialised case above).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from types import ModuleType
from typing import Any

# Loading either means a caller is about to resolve a model type or class through the Auto classes.
AUTO_MODULES = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")

_lock = threading.RLock()
_busy = False  # registering: the imports it causes must not start it again


def _initializing(module: Any) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _ready(finished: str | None = None) -> bool:
    """Auto classes loaded, and no transformers module other than `finished` (whose code has just run)
    still importing."""
    loaded = [sys.modules.get(name) for name in AUTO_MODULES]
    if not any(m is not None and (m.__name__ == finished or not _initializing(m)) for m in loaded):
        return False
    return not any(
        _initializing(module)
        for name, module in list(sys.modules.items())
        if name.partition(".")[0] == "transformers" and name != finished
    )


def _register_if_ready(finished: str | None = None) -> None:
    global _busy
    with _lock:
        if _busy or not _ready(finished):
            return
        _busy = True
        try:
            uninstall()
            from toolkit.models.registry import register_auto_classes

            register_auto_classes()
        finally:
            _busy = False


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders for `transformers` modules and wraps the found loader's
    `exec_module` so that each module's completion is seen."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if fullname.partition(".")[0] != "transformers" or _busy:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        # Only a loader made for this one module (source files are) may have its method replaced.
        if (
            loader is not None
            and getattr(loader, "name", None) == fullname
            and hasattr(loader, "exec_module")
        ):
            run = loader.exec_module

            def exec_module(module: ModuleType) -> None:
                run(module)
                _register_if_ready(finished=fullname)

            loader.exec_module = exec_module
        return spec


_watcher = _Watcher()


def install() -> None:
    """Register now when transformers' Auto classes are loaded, else as soon as they are."""
    with _lock:
        if _ready():
            _register_if_ready()
        elif _watcher not in sys.meta_path:
            sys.meta_path.insert(0, _watcher)


def uninstall() -> None:
    with _lock:
        if _watcher in sys.meta_path:
            sys.meta_path.remove(_watcher)
