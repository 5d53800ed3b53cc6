"""Character-level text that every machine has offline: the documentation shipped with CPython.

:func:`load_pydoc_text` reads ``pydoc_data.topics`` (the text of ``help("topics")``: about 465 KB
of English documentation in CPython 3.11), joins the topics in sorted order, maps each character
to an integer id and splits the stream by position into train / validation / test (the first 90%,
the next 5%, the last 5% by default). No download, no dependency. The text is CPython's, so it
differs between Python versions: record the version with any result (:attr:`TextCorpus.source`).
"""

from __future__ import annotations

import platform
from typing import NamedTuple

import numpy as np


class TextCorpus(NamedTuple):
  """A character-level corpus split by position.

  Attributes:
    train, val, test: int32 arrays of character ids, consecutive pieces of one stream.
    vocab: the characters, sorted; id ``i`` is ``vocab[i]``.
    source: where the text came from (module and Python version).
  """

  train: np.ndarray
  val: np.ndarray
  test: np.ndarray
  vocab: str
  source: str

  def encode(self, text: str) -> np.ndarray:
    """The ids of ``text`` (a ``KeyError`` names a character outside the vocabulary)."""
    index = {ch: i for i, ch in enumerate(self.vocab)}
    return np.asarray([index[ch] for ch in text], np.int32)

  def decode(self, ids: np.ndarray) -> str:
    """The text of ``ids``."""
    return "".join(self.vocab[int(i)] for i in np.asarray(ids).reshape(-1))


def load_pydoc_text(val_fraction: float = 0.05, test_fraction: float = 0.05) -> TextCorpus:
  """CPython's ``pydoc_data.topics`` as a character-level corpus, split by position.

  Args:
    val_fraction, test_fraction: the shares of the stream, each in ``(0, 0.5)``, held out at its end:
      validation first, then test.

  Returns:
    A :class:`TextCorpus`; ``train + val + test`` is the whole stream, in order.

  Raises:
    ValueError: a fraction outside ``(0, 0.5)``.

  Example:
    >>> corpus = load_pydoc_text()
    >>> corpus.decode(corpus.encode("def f(x):")) == "def f(x):"
    True
  """
  for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
    if not 0.0 < float(value) < 0.5:
      raise ValueError(f"`{name}` must be in (0, 0.5), got {value!r}")
  import pydoc_data.topics

  topics = pydoc_data.topics.topics
  text = "\n".join(topics[key] for key in sorted(topics))
  vocab = "".join(sorted(set(text)))
  index = {ch: i for i, ch in enumerate(vocab)}
  ids = np.fromiter((index[ch] for ch in text), np.int32, count=len(text))
  n_test, n_val = round(test_fraction * ids.size), round(val_fraction * ids.size)
  n_train = ids.size - n_val - n_test
  return TextCorpus(
    train=ids[:n_train],
    val=ids[n_train : n_train + n_val],
    test=ids[n_train + n_val :],
    vocab=vocab,
    source=f"pydoc_data.topics of CPython {platform.python_version()}",
  )
