"""One configuration system for every study: frozen dataclasses, their ranges and their flags.

A study's settings are one frozen dataclass deriving from :class:`StudyConfig`,
with the classmethods ``default()`` (the full study) and ``quick()`` (the smoke
test). Each field is declared once, with :func:`setting`::

  epochs: int = setting(60, "training epochs", low=1)

which puts its help text, its allowed range and, where it differs from the
field's name, its flag into ``dataclasses.field(metadata=...)``. From that one
declaration:

- ``__post_init__`` checks every field, however the config was made (in code,
  by ``replace``, from the command line): a :class:`ConfigError`, a
  ``ValueError`` naming the field and its allowed range;
- :func:`experiments.core.command.add_arguments` adds one flag per field (``--epochs``; bools get
  ``--x/--no-x``, tuples take comma-separated values, optional fields the word
  ``none``), whose type parses the text and applies the same check, so a bad
  value is a usage error naming the flag;
- :func:`~experiments.core.command.parse_args` reads ``--quick`` first and makes ``quick()``'s values the
  flags' defaults (``parser.set_defaults``), so a flag given on the command
  line wins over ``--quick``;
- :func:`~experiments.core.command.from_args` builds the config from the parsed flags;
- :class:`~experiments.core.command.Command` is a whole study's command line (``--quick``, the
  config's flags, an output folder and any extra flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

C = TypeVar("C", bound="StudyConfig")


class ConfigError(ValueError):
  """A configuration value a study cannot run with.

  Attributes:
    field: the offending field (for the main job also ``"method"`` or
      ``"dataset"``).
    detail: what is wrong with it, without the field's name (so a command
      line can prefix its own flag name).
  """

  def __init__(self, field: str, detail: str) -> None:
    super().__init__(f"{field} {detail}")
    self.field = field
    self.detail = detail


def _number(value: float) -> str:
  return str(value) if isinstance(value, int) else f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Spec:
  """The values a setting takes.

  Attributes:
    kind: ``bool``, ``int``, ``float`` or ``str``; for a tuple, its elements' kind.
    low, high: bounds (None: none); ``low_open`` / ``high_open`` exclude them.
    optional: None is allowed (the word ``none`` on the command line).
    words: further words and the values they stand for (``{"auto": "auto"}``).
    choices: the allowed strings of a ``str`` setting (empty: any).
    tuple_length: None for a scalar, -1 for a tuple of any positive length, else its length.
  """

  kind: type
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  optional: bool = False
  words: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  choices: tuple[str, ...] = ()
  tuple_length: int | None = None

  def _element(self, plural: bool) -> str:
    """``an integer >= 1``, ``finite numbers in [0, 1)``, ``one of a, b``, ..."""
    if self.kind is str:
      if self.choices:
        return ("names from " if plural else "one of ") + ", ".join(self.choices)
      return "strings" if plural else "a string"
    if self.kind is bool:
      return "booleans" if plural else "a boolean"
    noun = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers")}[self.kind][plural]
    low, high = self.low, self.high
    if low is not None and high is not None:
      bounds = f"in {'(' if self.low_open else '['}{_number(low)}, {_number(high)}{')' if self.high_open else ']'}"
    elif low is not None:
      bounds = f"{'>' if self.low_open else '>='} {_number(low)}"
    elif high is not None:
      bounds = f"{'<' if self.high_open else '<='} {_number(high)}"
    else:
      return noun
    return f"{noun} {bounds}"

  def describe(self, cli: bool = True) -> str:
    """What the setting must be, as the errors say it.

    Args:
      cli: as command-line text (``comma-separated integers >= 1 or none``);
        else as Python values (``a tuple of integers >= 1 or None``).
    """
    if self.tuple_length is None:
      text = self._element(plural=False)
    else:
      count = "" if self.tuple_length < 0 else f"{self.tuple_length} "
      text = ("comma-separated " if cli else f"a tuple of {count}") + self._element(plural=True)
      text = f"{count}{text}" if cli else text
    if cli:
      words = [*(["none"] if self.optional else []), *(w if w else "''" for w in self.words)]
    else:
      words = [*(["None"] if self.optional else []), *(repr(v) for v in self.words.values() if v is not None)]
    if not words:
      return text
    return f"{text}, {', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else f"{text} or {words[0]}"

  def _element_ok(self, value: Any) -> bool:
    is_bool = bool(isinstance(value, (bool, np.bool_)))
    if self.kind is bool or is_bool:
      return self.kind is bool and is_bool
    if self.kind is str:
      return isinstance(value, str) and (not self.choices or value in self.choices)
    numeric = (int, np.integer) if self.kind is int else (int, float, np.integer, np.floating)
    if not isinstance(value, numeric) or (self.kind is float and not math.isfinite(value)):
      return False
    if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
      return False
    return bool(self.high is None or (value < self.high if self.high_open else value <= self.high))

  def accepts(self, value: Any) -> bool:
    """Whether ``value`` is one of the setting's values."""
    if value is None:
      return self.optional or None in self.words.values()
    if any(value is w or (type(value) is type(w) and value == w) for w in self.words.values()):
      return True
    if self.tuple_length is None:
      return self._element_ok(value)
    if not isinstance(value, tuple) or not value or (self.tuple_length >= 0 and len(value) != self.tuple_length):
      return False
    return all(self._element_ok(v) for v in value)

  def check(self, name: str, value: Any) -> None:
    """Raises :class:`ConfigError` naming ``name`` and the range unless :meth:`accepts` ``value``."""
    if not self.accepts(value):
      raise ConfigError(name, f"must be {self.describe(cli=False)}, got {value!r}")

  def _convert(self, text: str) -> Any:
    if self.kind is int:
      return int(text)
    if self.kind is float:
      return float(text)
    return text.strip().lower() if self.choices else text

  def parse(self, text: str) -> Any:
    """The value of the command-line text ``text``; ``argparse.ArgumentTypeError`` saying the range if none."""
    word = text.strip().lower()
    if self.optional and word == "none":
      return None
    if word in self.words:
      return self.words[word]
    shown = repr(text)
    try:
      if self.tuple_length is None:
        value = self._convert(text)
        shown = str(value) if self.kind is int else shown
      else:
        value = tuple(self._convert(part) for part in text.split(","))
    except ValueError:
      value = dataclasses.MISSING
    if value is dataclasses.MISSING or not self.accepts(value):
      raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {shown}")
    return value

  def argparse_type(self) -> Callable[[str], Any]:
    """:meth:`parse` as an argparse ``type`` (its name is what argparse's own errors show)."""

    def parse(text: str) -> Any:
      return self.parse(text)

    parse.__name__ = self.describe()
    return parse


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], Any]:
  """An argparse type for a flag that is no config field: an integer in ``[low, high]`` (None: unbounded)."""
  return Spec(int, low=low, high=high).argparse_type()


def setting(
  default: Any,
  help: str,
  *,
  flag: str | None = "",
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  words: Mapping[str, Any] | None = None,
  choices: Sequence[str] = (),
  group: str | None = None,
) -> Any:
  """A config field: ``dataclasses.field(default=default, metadata={"help": help, ...})``.

  Args:
    default: the field's default.
    help: its description (the flag's help text).
    flag: the flag's name without ``--``; ``""`` (the default) derives it from
      the field's name (``batch_size`` -> ``--batch-size``); None: no flag
      (set by the study itself, or not expressible as text).
    low, high, low_open, high_open: the allowed range of a number, or of
      each element of a tuple; the bounds are included unless ``*_open``.
    words: command-line words and the values they stand for, beyond
      ``none`` (which an optional field always takes).
    choices: the allowed values of a string field.
    group: the heading the flag is listed under in ``--help``.
  """
  meta: dict[str, Any] = {
    "help": help,
    "flag": flag,
    "group": group,
    "words": dict(words or {}),
    "choices": tuple(choices),
  }
  meta |= {"low": low, "high": high, "low_open": low_open, "high_open": high_open}
  return dataclasses.field(default=default, metadata=meta)


def _spec(hint: Any, meta: Mapping[str, Any]) -> Spec | None:
  """The :class:`Spec` of a field of type ``hint``; None for a type no flag can express."""
  args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
  members = [a for a in args if a is not type(None)] or [hint]
  optional = len(members) < len(args)
  kinds = [m for m in members if m in (bool, int, float, str)]
  tuple_length = None
  if len(members) == 1 and typing.get_origin(members[0]) is tuple:
    elems = typing.get_args(members[0])
    if not elems or not all(e in (bool, int, float, str) for e in elems if e is not Ellipsis):
      return None
    tuple_length = -1 if (len(elems) == 2 and elems[1] is Ellipsis) else len(elems)
    kinds = [elems[0]]
  elif len(kinds) != len(members):
    return None
  kind = int if int in kinds else kinds[0]  # int | str: the strings come from `words`
  keys = ("low", "high", "low_open", "high_open", "words", "choices")
  return Spec(kind, optional=optional, tuple_length=tuple_length, **{k: meta[k] for k in keys if k in meta})


_SPECS: dict[type, dict[str, Spec | None]] = {}


def specs(cls: type) -> dict[str, Spec | None]:
  """Every field of the config class ``cls`` -> its :class:`Spec` (None: unchecked, no flag)."""
  if cls not in _SPECS:
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    _SPECS[cls] = {f.name: _spec(hints[f.name], f.metadata) for f in dataclasses.fields(cls)}
  return _SPECS[cls]


def flags(cls: type) -> dict[str, str]:
  """Field name -> its flag (``--lr``), for the fields that have one."""
  out = {}
  for f in dataclasses.fields(cls):
    name = f.metadata.get("flag", "")
    if name is not None and specs(cls)[f.name] is not None:
      out[f.name] = "--" + (name or f.name.replace("_", "-"))
  return out


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Base of the studies' configs: a frozen dataclass, range-checked when made (see the module docstring)."""

  def __post_init__(self) -> None:
    for name, spec in specs(type(self)).items():
      if spec is not None:
        spec.check(name, getattr(self, name))

  @classmethod
  def default(cls: type[C]) -> C:
    """The full study."""
    return cls()

  @classmethod
  def quick(cls: type[C]) -> C:
    """The smoke test (a small configuration that runs in seconds to a minute)."""
    return cls()

  def replace(self: C, **changes: Any) -> C:
    """A copy with ``changes`` applied (checked like any new config)."""
    return dataclasses.replace(self, **changes)
