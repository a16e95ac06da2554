"""The book's chapter-14 code (``chapter14.py`` on Keras 3, ``chapter14_keras2.py`` on tf_keras), and one helper."""

from __future__ import annotations

import keras

from book import chapter14


def build_book_model(*args: object, **kwargs: object) -> keras.Sequential:
    """``chapter14.build_book_model``, run as written, with its Sequential's graph built once at the end.

    Keras 3's ``Sequential.add`` rebuilds the whole functional graph after every add when the model starts with an
    Input, as the book's does: 24 adds cost ~2.8 s per build here, against ~0.9 s for one rebuild at the end. The
    layers, their names, weights and graph are the same; only the intermediate graphs are skipped.
    """
    rebuild = keras.Sequential._maybe_rebuild
    keras.Sequential._maybe_rebuild = lambda self: None
    try:
        model = chapter14.build_book_model(*args, **kwargs)
    finally:
        keras.Sequential._maybe_rebuild = rebuild
    model._maybe_rebuild()
    return model
