"""The project's own errors: a model that cannot be found, named, read or built; a kernel that cannot run."""


class LoadError(ValueError):
    """A model file or name that ``medt_keras.load`` (or the converter) cannot use.

    The message names the file or name and says what is wrong with it. The
    converter's ``CheckpointError`` is a subclass, so ``except LoadError``
    catches every loading failure. A ``ValueError``, so callers that caught
    ``ValueError`` before keep working.
    """


class KernelUnavailableError(RuntimeError):
    """A kernel named by ``attention=`` that cannot run a layer here (``medt_keras.kernels.dispatch``).

    The message says why: the platform, the number of devices, the dtype,
    the layer's size, or what building the kernel for this CPU found.
    ``attention="auto"`` never raises it; it falls back instead.
    """
