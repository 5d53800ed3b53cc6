"""experiments.core.text: CPython's documentation as a character-level corpus (the language-model study's data)."""

import numpy as np
import pytest

from experiments.core import text


def test_pydoc_corpus_is_the_whole_stream_split_by_position():
  corpus = text.load_pydoc_text()
  import pydoc_data.topics

  topics = pydoc_data.topics.topics
  whole = "\n".join(topics[k] for k in sorted(topics))
  ids = np.concatenate([corpus.train, corpus.val, corpus.test])
  assert corpus.decode(ids) == whole  # nothing lost, nothing reordered
  assert corpus.train.dtype == corpus.val.dtype == corpus.test.dtype == np.int32
  n = len(whole)
  assert corpus.val.size == round(0.05 * n)
  assert corpus.test.size == round(0.05 * n)
  assert n > 400_000  # about 465 KB in CPython 3.11
  assert list(corpus.vocab) == sorted(set(whole))
  assert "CPython" in corpus.source


def test_the_same_corpus_every_time_and_encode_decode():
  a, b = text.load_pydoc_text(), text.load_pydoc_text()
  for x, y in zip(a[:3], b[:3], strict=True):
    np.testing.assert_array_equal(x, y)
  assert a.decode(a.encode("lambda x: x")) == "lambda x: x"
  with pytest.raises(KeyError):
    a.encode("\x00")


@pytest.mark.parametrize("kwargs", [dict(val_fraction=0.0), dict(test_fraction=0.5), dict(val_fraction=-0.1)])
def test_bad_fractions_name_the_argument(kwargs):
  (name,) = kwargs
  with pytest.raises(ValueError, match=rf"`{name}` must be in \(0, 0.5\)"):
    text.load_pydoc_text(**kwargs)
