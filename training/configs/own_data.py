"""Your own large images in the official folder layout: random crops per epoch, whole-image tiled evaluation.

    medt-train --config own_data --manual-dir DATA

``DATA`` holds one folder per split (``docs/own-data.md``)::

    DATA/train/img/<name>.png        DATA/train/labelcol/<name>.png   (0 background, 255 foreground)
    DATA/validation/img/...          DATA/validation/labelcol/...     (optional; else 10% of train)
    DATA/test/img/...                DATA/test/labelcol/...

Images of any size (and of different sizes). Each epoch is 1200 random
64x64 crops (300 steps of 4), drawn with replacement across the training
images, each image with probability proportional to its area; validation
and test run sliding windows over each whole image (as ``medt-predict``)
and pool F1/IoU over all their pixels. Grayscale by default (``dataset``
``medt_folder/gray``); use ``--dataset medt_folder`` for RGB. For sparse
objects add ``--foreground-fraction 0.5`` (half of the crops centred on a
foreground pixel).

CPU (2 cores): 3 epochs of the demo's 300 steps (about 2-3 minutes each on
an idle machine, estimated from ``gated_hela``) plus the whole-image
validation. On a GPU, train longer and larger:
``--epochs 50 --crop-size 128 --img-size 128 --examples-per-epoch 4000``
(or ``--model medt`` for the paper's model).

Measured on the HeLa frames exported as a folder (``python -m
medt_keras.datasets export-hela DIR --medt-folder``): whole-frame test F1
0.943, IoU 0.892 (the same with ``medt-predict`` + ``medt-evaluate``; 0.947
/ 0.899 on the frames cut by hand into 64x64 tiles), best validation epoch
3, 1540 s on the shared, loaded 2-core machine; see ``docs/own-data.md``.
"""

from training.config import TrainConfig

CONFIG = TrainConfig(
    model="gated",
    dataset="medt_folder/gray",
    img_size=64,
    crop_size=64,
    examples_per_epoch=1200,
    epochs=3,
    eval_protocol="tiled",
    checkpoint_every=1,
)
