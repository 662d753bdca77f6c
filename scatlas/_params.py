"""Declared parameter rules: each public function states its constraints once.

As scikit-learn's ``utils/_param_validation.py``: a function decorated with
:func:`validate_params` lists, per parameter, the values it accepts (:class:`Interval`,
:class:`Options`, :class:`Each`, or ``None``); the decorator checks them at the call, before the
function runs, and raises :class:`~scatlas.exceptions.ScatlasInputError` naming the parameter
(``err.param``) with the message scatlas has always used (``k must be >= 1, got 0``). Rules that
depend on the data (``k`` below the number of cells) stay in the function body, in shared
helpers of :mod:`scatlas._validate`.

The rules are kept on the function (``func.__scatlas_params__``), so one common test feeds every
decorated function invalid values built from its own rules (``tests/test_param_rules.py``).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .exceptions import ScatlasInputError

__all__ = ["Each", "Interval", "Options", "check_param", "validate_params"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value,
                                                                                        bool)


@dataclass(frozen=True)
class Interval:
    """Integers (``kind="int"``) or finite real numbers (``kind="real"``) between ``left`` and
    ``right`` (None: unbounded), ``closed`` on ``"both"``, ``"left"``, ``"right"`` or
    ``"neither"`` side."""

    kind: str
    left: float | None = None
    right: float | None = None
    closed: str = "both"

    def _bounds_ok(self, v: float) -> bool:
        lo_closed = self.closed in ("both", "left")
        hi_closed = self.closed in ("both", "right")
        if self.left is not None and (v < self.left or (v == self.left and not lo_closed)):
            return False
        return not (self.right is not None
                    and (v > self.right or (v == self.right and not hi_closed)))

    def error(self, value: Any, name: str) -> str | None:
        """The message for a value that breaks the rule; None when it holds."""
        if self.kind == "int":
            if not _is_int(value):
                return f"{name} must be an integer, got {value!r}"
        elif not _is_real(value) or not math.isfinite(float(value)):
            return f"{name} must be a finite number{self._range_text()}, got {value!r}"
        if not self._bounds_ok(float(value)):
            return f"{name} must be{self._range_text(short=True)}, got {value!r}"
        return None

    def _range_text(self, short: bool = False) -> str:
        lo = ">=" if self.closed in ("both", "left") else ">"
        hi = "<=" if self.closed in ("both", "right") else "<"
        if self.left is not None and self.right is not None:
            left = "[" if lo == ">=" else "("
            right = "]" if hi == "<=" else ")"
            text = f"in {left}{self.left:g}, {self.right:g}{right}"
        elif self.left is not None:
            text = f"{lo} {self.left:g}"
        elif self.right is not None:
            text = f"{hi} {self.right:g}"
        else:
            return "" if not short else " a number"
        return f" {text}"

    def invalid_examples(self) -> list[Any]:
        """Values that break the rule (for the common test)."""
        out: list[Any] = ["x", None]
        if self.kind == "int":
            out.append(1.5)
        else:
            out.append(float("nan"))
        if self.left is not None:
            out.append(self.left - 1 if self.closed in ("both", "left") else self.left)
        if self.right is not None:
            out.append(self.right + 1 if self.closed in ("both", "right") else self.right)
        return out

    def valid_example(self) -> Any:
        """A value that obeys the rule (for the common test)."""
        lo_closed = self.closed in ("both", "left")
        if self.left is None:
            v = 0 if self.right is None else self.right - 1
        elif lo_closed:
            v = self.left
        elif self.kind == "int" or self.right is None:
            v = self.left + 1
        else:
            v = (self.left + self.right) / 2
        return int(v) if self.kind == "int" else float(v)


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values (compared with ``==``; strings are case-sensitive)."""

    values: tuple[Any, ...]

    def error(self, value: Any, name: str) -> str | None:
        if isinstance(value, np.bool_):  # NumPy's booleans are Python's for an option
            value = bool(value)
        try:
            ok = any(value == v and type(value) is type(v) for v in self.values)
        except (TypeError, ValueError):  # arrays compare element-wise
            ok = False
        return None if ok else f"{name} must be one of {self.values}, got {value!r}"

    def invalid_examples(self) -> list[Any]:
        return ["not-an-option", 12345]

    def valid_example(self) -> Any:
        return self.values[0]


@dataclass(frozen=True)
class Each:
    """A value obeying ``rule``, or a 1-D sequence / array of such values (one per dataset, say;
    the length is the function's own check)."""

    rule: Interval | Options

    def error(self, value: Any, name: str) -> str | None:
        if isinstance(value, Sequence | np.ndarray) and not isinstance(value, str):
            for i, v in enumerate(np.asarray(value, dtype=object).ravel().tolist()):
                message = self.rule.error(v, f"{name}[{i}]")
                if message is not None:
                    return message
            return None
        return self.rule.error(value, name)

    def invalid_examples(self) -> list[Any]:
        bad = [v for v in self.rule.invalid_examples() if v is not None]
        return [*bad, [self.rule.valid_example(), bad[-1]]]

    def valid_example(self) -> Any:
        return self.rule.valid_example()


Rule = Interval | Options | Each | None


def check_param(value: Any, name: str, rules: Rule | tuple[Rule, ...]) -> Any:
    """``value`` if it obeys one of ``rules`` (``None`` in them admits None); else raise
    :class:`ScatlasInputError` with the first rule's message, naming ``name``."""
    rules = rules if isinstance(rules, tuple) else (rules,)
    if value is None and None in rules:
        return value
    messages = []
    for rule in rules:
        if rule is None:
            continue
        message = rule.error(value, name)
        if message is None:
            return value
        messages.append(message)
    if None in rules:
        messages[0] = messages[0].replace(f"{name} must be", f"{name} must be None or", 1)
    raise ScatlasInputError(messages[0], param=name)


def validate_params(**rules: Rule | tuple[Rule, ...]) -> Callable:
    """Decorate a public function with its parameters' rules (see the module docstring).

    The rules are checked on the arguments as called, defaults included, in the order given;
    the first broken rule raises. ``func.__scatlas_params__`` holds the rules."""

    def decorate(func: Callable) -> Callable:
        sig = inspect.signature(func)
        unknown = sorted(set(rules) - set(sig.parameters))
        if unknown:
            raise TypeError(f"{func.__qualname__} has no parameter(s) {unknown}")

        @functools.wraps(func)
        def checked(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError:
                return func(*args, **kwargs)  # Python's own message for a wrong call
            for name, rule in rules.items():
                value = bound.arguments.get(name, sig.parameters[name].default)
                check_param(value, name, rule)
            return func(*args, **kwargs)

        checked.__scatlas_params__ = dict(rules)  # type: ignore[attr-defined]
        return checked

    return decorate


#: the rules most functions share
POSITIVE_INT = Interval("int", 1)
NONNEGATIVE_INT = Interval("int", 0)
SEED = Interval("int")
NONNEGATIVE = Interval("real", 0)
