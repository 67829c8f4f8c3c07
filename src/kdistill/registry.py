"""One small name → factory map for the names that YAML and the CLI use.

The Python API takes objects; registries exist only so that a config can say
``model: small_cnn`` or ``loss: kd``. Registering a name twice is an error (a silent
overwrite would make a config mean different things depending on import order).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; ``module.path:attr`` strings import user factories.

    A factory may be registered as such a string too: it is imported on first use, so a
    registry can name factories of heavy optional packages (``kdistill.lm``) without
    importing them with the registry.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T] | str] = {}

    def add(self, name: str, factory: Callable[..., T] | str) -> None:
        if name in self._factories:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._factories[name] = factory

    def get(self, name: str) -> Callable[..., T]:
        """The factory for ``name``, or the attribute named by ``package.module:attr``."""
        if name in self._factories:
            factory = self._factories[name]
            if isinstance(factory, str):  # registered lazily: import it now, once
                factory = self._factories[name] = _import_attr(factory, self.kind)
            return factory
        if ":" in name:
            return _import_attr(name, self.kind)
        hint = difflib.get_close_matches(name, self.names(), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise KeyError(
            f"unknown {self.kind} {name!r}{extra}; choose one of: {', '.join(self.names())}, "
            f"or give an import path such as 'my_package.module:make_{self.kind}'"
        )

    def build(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _import_attr(path: str, kind: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise KeyError(f"{kind} {path!r}: cannot import module {module_name!r} ({err})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise KeyError(
            f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}"
        ) from None
