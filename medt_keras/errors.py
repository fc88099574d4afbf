"""The project's own error for a model that cannot be found, named, read or built."""


class LoadError(ValueError):
    """A model file or name that ``medt_keras.load`` (or the converter) cannot use.

    The message names the file or name and says what is wrong with it. The
    converter's ``CheckpointError`` is a subclass, so ``except LoadError``
    catches every loading failure. A ``ValueError``, so callers that caught
    ``ValueError`` before keep working.
    """
