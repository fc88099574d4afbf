"""Reading, checking and encoding the images and masks the dataset builders store.

Everything here is NumPy and Pillow (tifffile for TIFF stacks): preparing a
dataset needs neither TensorFlow nor OpenCV. Every failure is a
``DatasetError`` that names the file at fault.
"""

import io
import os

import numpy as np


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names it."""


def read_image(path, channels):
    """Reads an image file as ``(height, width, channels)`` uint8.

    ``channels=3`` gives RGB (a grayscale file is repeated over the three
    channels, as OpenCV's colour read does); ``channels=1`` gives the
    luminance (OpenCV's grayscale read, the official ``--gray yes``).
    """
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I", "F"):
                array = np.asarray(image)
                raise DatasetError(
                    f"{path}: {array.dtype} image of mode {image.mode}; the builders store 8-bit images. "
                    "Convert it to 8 bits first."
                )
            image = image.convert("RGB" if channels == 3 else "L")
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise DatasetError(f"{path}: cannot read the image ({error}).") from error
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def read_mask(path, binary=True, threshold=127):
    """Reads a mask as ``(height, width, 1)`` uint8 class indices.

    ``binary=True`` thresholds the grayscale mask at ``> threshold`` as the
    official loader does (``mask[mask <= 127] = 0; mask[mask > 127] = 1``);
    otherwise the pixel values are kept as class indices.
    """
    return mask_to_classes(read_image(path, channels=1), binary, threshold)


def mask_to_classes(mask, binary=True, threshold=127):
    mask = np.asarray(mask)
    if binary:
        return (mask > threshold).astype(np.uint8)
    return mask.astype(np.uint8)


def check_same_size(image, mask, image_path, mask_path):
    if image.shape[:2] != mask.shape[:2]:
        raise DatasetError(
            f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} (height x width) but its image "
            f"{image_path} is {image.shape[0]}x{image.shape[1]}."
        )


def encode_png(array):
    """PNG bytes of a ``(height, width)`` or ``(height, width, 1|3)`` uint8 array."""
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"encode_png takes uint8 arrays, got {array.dtype}.")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def percentile_normalize(frame, low=1.0, high=99.8, per_channel=False):
    """``clip((frame - p_low) / (p_high - p_low), 0, 1)`` as float32, from the frame's own percentiles.

    ``per_channel=True``: a ``(height, width, channels)`` image, each channel
    with its own percentiles.
    """
    if per_channel:
        return np.stack([percentile_normalize(frame[..., c], low, high) for c in range(frame.shape[-1])], axis=-1)
    frame = np.asarray(frame, dtype=np.float64)
    p_low, p_high = np.percentile(frame, [low, high])
    scale = max(p_high - p_low, 1e-12)
    return np.clip((frame - p_low) / scale, 0.0, 1.0).astype(np.float32)


def tile_grid(height, width, tile_size):
    """Top-left corners ``(row, col, y, x)`` of the whole non-overlapping tiles, from the top-left corner."""
    tile_height, tile_width = (tile_size, tile_size) if np.isscalar(tile_size) else tile_size
    return [
        (row, col, row * tile_height, col * tile_width)
        for row in range(height // tile_height)
        for col in range(width // tile_width)
    ]


def read_image_native(path):
    """Reads PNG, JPEG, BMP or TIFF (8- or 16-bit, gray, RGB or RGBA) as ``(height, width, channels)``, native dtype.

    The alpha channel of RGBA images is dropped; palette images become RGB.
    A TIFF with several pages gives its first page.
    """
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: file not found.")
    try:
        if path.lower().endswith((".tif", ".tiff")):
            import tifffile

            array = np.asarray(tifffile.imread(path, key=0))
        else:
            with Image.open(path) as image:
                image.load()
                if image.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "1"):
                    image = image.convert("RGBA" if "A" in image.mode else "RGB")
                array = np.asarray(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DatasetError(f"{path}: cannot read the image ({error}).") from error
    except Exception as error:  # tifffile raises several types for broken files
        raise DatasetError(f"{path}: cannot read the image ({type(error).__name__}: {error}).") from error
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise DatasetError(f"{path}: expected a 2-D gray, RGB or RGBA image, got an array of shape {array.shape}.")
    if array.shape[-1] == 4:
        array = array[..., :3]
    return array
