"""What a model expects of its input images, kept in the model's config.

A model's ``preprocessing`` is ``None`` (not recorded: files saved before
it existed) or a dict

    {"channel_order": "bgr" | "rgb", "normalize": "dtype" | "percentile" | "auto"}

``channel_order``: the order of colour channels the model was trained on
(the official code reads images with OpenCV: BGR). ``normalize``: how raw
pixels become floats in [0, 1]: ``dtype`` divides integers by their type's
maximum (uint8 / 255, torchvision's ``ToTensor``), ``percentile`` stretches
each frame's 1st-99.8th percentiles to [0, 1] (16-bit microscopy),
``auto`` picks ``dtype`` for uint8 files and ``percentile`` otherwise. The
tile size is the model's own input size (``img_size``).
"""

CHANNEL_ORDERS = ("bgr", "rgb")
NORMALIZATIONS = ("dtype", "percentile", "auto")

# The official training code reads 8-bit files with cv2.imread (BGR) and ToTensor (/ 255): "auto" is
# exactly that for uint8 files, and stretches 16-bit ones instead of darkening them.
OFFICIAL_PREPROCESSING = {"channel_order": "bgr", "normalize": "auto"}


def check_preprocessing(preprocessing):
    """``preprocessing`` validated and copied (``None`` stays ``None``); ``ValueError`` naming the bad field."""
    if preprocessing is None:
        return None
    preprocessing = dict(preprocessing)
    unknown = sorted(set(preprocessing) - {"channel_order", "normalize"})
    if unknown:
        raise ValueError(f"preprocessing: unknown field(s) {', '.join(unknown)}; expected channel_order, normalize.")
    channel_order = preprocessing.get("channel_order", "bgr")
    normalize = preprocessing.get("normalize", "auto")
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"preprocessing: channel_order {channel_order!r}; use one of {', '.join(CHANNEL_ORDERS)}.")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"preprocessing: normalize {normalize!r}; use one of {', '.join(NORMALIZATIONS)}.")
    return {"channel_order": channel_order, "normalize": normalize}
