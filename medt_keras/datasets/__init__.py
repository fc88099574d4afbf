"""TFDS dataset builders for segmentation, prepared to array_record and read without TensorFlow.

``load(name)`` prepares a builder (once) and returns its splits as
``tfds.data_source`` objects: random access by index, ``len()``, each
example a dict of NumPy arrays (see ``segmentation.py`` for the layout).
"""

import os

import tensorflow_datasets as tfds

from medt_keras.datasets.glas import Glas
from medt_keras.datasets.hela_nuclei import HelaNuclei
from medt_keras.datasets.images import DatasetError
from medt_keras.datasets.medt_folder import MedtFolder
from medt_keras.datasets.monuseg import Monuseg

BUILDERS = {"hela_nuclei": HelaNuclei, "medt_folder": MedtFolder, "glas": Glas, "monuseg": Monuseg}


def register(name, builder_class):
    BUILDERS[name] = builder_class


def builder(name, data_dir=None, manual_dir=None):
    """The builder ``name`` or ``name/config`` (e.g. ``hela_nuclei/tiles64``), array_record format."""
    base, _, config = name.partition("/")
    if base not in BUILDERS:
        raise DatasetError(f"unknown dataset {base!r}; known: {', '.join(sorted(BUILDERS))}.")
    kwargs = dict(data_dir=data_dir, file_format="array_record")
    if config:
        kwargs["config"] = config
    instance = BUILDERS[base](**kwargs)
    instance._medt_manual_dir = manual_dir
    return instance


def load(name, data_dir=None, manual_dir=None):
    """Prepares ``name`` if needed and returns ``{split: data source}``."""
    instance = builder(name, data_dir, manual_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
    instance.download_and_prepare(download_config=download_config)
    return instance.as_data_source()


__all__ = [
    "BUILDERS", "DatasetError", "Glas", "HelaNuclei", "MedtFolder", "Monuseg", "builder", "load", "register",
]
