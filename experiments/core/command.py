"""A study's command line from its config class (see :mod:`experiments.core.config`).

One flag per config field, ``--quick`` making the quick config's values the flags' defaults, and
:class:`Command`, a whole study's command line (``--quick``, the config's flags, an output folder
and any extra flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic

from experiments.core.config import C, StudyConfig, flags, specs


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Shows each flag's default and keeps the description's line breaks."""


def add_arguments(parser: argparse.ArgumentParser, cls: type[StudyConfig]) -> None:
  """Adds one flag per field of ``cls`` that has one, with ``cls.default()``'s values as defaults.

  The flag's dest is the field's name; its help is the field's ``help``
  metadata; under its ``group`` heading if it has one.
  """
  groups: dict[str, Any] = {}
  defaults = cls.default()
  named = flags(cls)
  for f in dataclasses.fields(cls):
    if f.name not in named:
      continue
    spec, meta = specs(cls)[f.name], f.metadata
    assert spec is not None
    target = parser
    if meta.get("group"):
      target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
    ranged = spec.low is not None or spec.high is not None or spec.choices
    help_text = f"{meta['help']}; {spec.describe()}" if ranged else meta["help"]
    kwargs: dict[str, Any] = {"dest": f.name, "default": getattr(defaults, f.name), "help": help_text}
    if spec.kind is bool and spec.tuple_length is None:
      target.add_argument(named[f.name], action=argparse.BooleanOptionalAction, **kwargs)
    else:
      metavar = f.name.upper() if spec.tuple_length is None else f"{f.name.upper()},..."
      target.add_argument(named[f.name], type=spec.argparse_type(), metavar=metavar, **kwargs)


def set_defaults(parser: argparse.ArgumentParser, config: StudyConfig) -> None:
  """Makes ``config``'s values the defaults of its fields' flags (for ``--quick``: ``cls.quick()``)."""
  parser.set_defaults(**{name: getattr(config, name) for name in flags(type(config))})


def from_args(cls: type[C], args: argparse.Namespace) -> C:
  """The config of the parsed command line ``args``.

  ``cls.quick()`` if ``args.quick`` is set, else ``cls.default()``, with every
  field that has a flag taken from ``args`` (the others, e.g. a study's
  settings no flag can express, stay the base config's).
  """
  base = cls.quick() if getattr(args, "quick", False) else cls.default()
  return base.replace(**{name: getattr(args, name) for name in flags(cls)})


def study_parser(
  cls: type[StudyConfig], quick: bool, *, prog: str, description: str, quick_help: str
) -> argparse.ArgumentParser:
  """A study's command line: ``--quick`` and a flag per field of ``cls`` (the study adds its other flags).

  Args:
    cls: the study's config class.
    quick: make ``cls.quick()``'s values the flags' defaults, as ``--quick`` does.
    prog, description: of the ``argparse.ArgumentParser``.
    quick_help: what ``--quick`` runs.
  """
  parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
  parser.add_argument("--quick", action="store_true", help=f"{quick_help}; flags given explicitly override it")
  add_arguments(parser, cls)
  if quick:
    set_defaults(parser, cls.quick())
  return parser


def quick_requested(argv: Sequence[str] | None) -> bool:
  """Whether the command line ``argv`` (None: ``sys.argv[1:]``) holds ``--quick``."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--quick", action="store_true")
  return pre.parse_known_args(argv)[0].quick


def parse_args(
  build_parser: Callable[[bool], argparse.ArgumentParser], argv: Sequence[str] | None
) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
  """``(parser, args)``: ``argv`` parsed by ``parser = build_parser(quick)``, ``quick`` = ``argv`` holds ``--quick``.

  ``build_parser(True)`` sets the quick config's values as defaults
  (:func:`set_defaults`), so flags given explicitly still win.
  """
  parser = build_parser(quick_requested(argv))
  return parser, parser.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Command(Generic[C]):
  """A study's command line: ``--quick``, a flag per field of its config, an output folder and extra flags.

  Attributes:
    cls: the study's config class.
    prog, description: of the ``argparse.ArgumentParser``.
    quick_help: what ``--quick`` runs.
    out: the output folder's default without and with ``--quick``.
    out_flag: the output folder's flag.
    extra: further flags, name -> keyword arguments of ``add_argument``.
  """

  cls: type[C]
  prog: str
  description: str
  quick_help: str
  out: tuple[str, str]
  out_flag: str = "--out"
  extra: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  def build_parser(self, quick: bool = False) -> argparse.ArgumentParser:
    """The parser; ``quick``: with the quick config's values (and output folder) as defaults."""
    parser = study_parser(self.cls, quick, prog=self.prog, description=self.description, quick_help=self.quick_help)
    parser.add_argument(self.out_flag, default=self.out[quick], help="output folder")
    for flag, kwargs in self.extra.items():
      parser.add_argument(flag, **kwargs)
    return parser

  def parse(self, argv: Sequence[str] | None = None) -> tuple[C, argparse.Namespace, str]:
    """``(config, args, command)`` of the command line ``argv`` (None: ``sys.argv[1:]``).

    ``command`` is the command line as text, for the study's outputs.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _, args = parse_args(self.build_parser, argv)
    return from_args(self.cls, args), args, " ".join([self.prog, *argv])
