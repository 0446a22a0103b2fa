"""What a rank pool's call names and carries: ``CallTarget`` (a module-level function as the ranks find it) and
``check_call`` (a call's arguments, checked before any rank starts)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastdeploy_patch.testing import pickles


@dataclass(frozen=True)
class CallTarget:
    """A module-level function as the ranks find it: its module's name, its qualified name, and the file the test
    process loaded that module from (for modules that are not importable by name)."""

    module: str
    qualname: str
    file: str | None

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> CallTarget:
        """The target naming ``fn``; ``TypeError``/``ValueError`` unless the ranks can import ``fn`` by name."""
        module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
        if not callable(fn) or not isinstance(module, str) or not isinstance(qualname, str):
            raise TypeError(f"fn must be a module-level function, got {fn!r}")
        if "<" in qualname or module == "__main__":
            raise ValueError(
                f"fn must be defined at module level of an importable module (the ranks import it by name), got "
                f"{module}:{qualname}"
            )
        loaded = sys.modules.get(module)
        found: Any = loaded
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if found is not fn:
            raise ValueError(f"fn is not what {module}:{qualname} names, so the ranks could not import it: {fn!r}")
        return cls(module, qualname, getattr(loaded, "__file__", None))

    def __str__(self) -> str:
        return f"{self.module}:{self.qualname}"


def check_call(nranks: object, kwargs: object, timeout: object, env: object) -> tuple[dict, dict]:
    """Check a call's arguments before anything starts; returns ``kwargs`` and ``env`` as plain dicts."""
    if isinstance(nranks, bool) or not isinstance(nranks, int) or nranks < 1:
        raise ValueError(f"nranks must be a positive integer, got {nranks!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
        raise TypeError(f"kwargs must be a mapping of argument names to values, got {kwargs!r}")
    for name, value in kwargs.items():
        pickles.dumps(value, f"the test process cannot send kwargs[{name!r}] to the ranks")
    env = {} if env is None else env
    if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError(f"env must map variable names to strings, got {env!r}")
    return dict(kwargs), dict(env)
