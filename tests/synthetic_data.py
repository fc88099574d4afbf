"""Small synthetic segmentation data written in the official MedT folder layout."""

import os

import numpy as np
from PIL import Image


def disc_example(rng, size, channels=3):
    """An image with 1-3 bright discs on noise and its 0/255 mask."""
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(size / 10, size / 4)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    image = rng.normal(50, 15, (size, size, channels)) + 140 * mask[..., None]
    image = np.clip(image, 0, 255).astype(np.uint8)
    return (image[..., 0] if channels == 1 else image), (mask * 255).astype(np.uint8)


def write_medt_folder(root, counts, size=32, seed=0, channels=3, image_ext=".png"):
    """Writes ``root/<split>/{img,labelcol}/`` for ``counts = {split: number}``; returns root."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        os.makedirs(os.path.join(root, split, "img"), exist_ok=True)
        os.makedirs(os.path.join(root, split, "labelcol"), exist_ok=True)
        for i in range(count):
            image, mask = disc_example(rng, size, channels)
            Image.fromarray(image).save(os.path.join(root, split, "img", f"{split}_{i:03d}{image_ext}"))
            Image.fromarray(mask).save(os.path.join(root, split, "labelcol", f"{split}_{i:03d}.png"))
    return root


def sparse_example(rng, height, width, objects=6, radius=(4, 8), channels=1):
    """A large ``(height, width)`` image with ``objects`` small bright discs (sparse foreground) and its 0/255 mask."""
    yy, xx = np.mgrid[:height, :width]
    mask = np.zeros((height, width), bool)
    for _ in range(objects):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(*radius) ** 2
    image = rng.normal(50, 15, (height, width, channels)) + 140 * mask[..., None]
    image = np.clip(image, 0, 255).astype(np.uint8)
    return (image[..., 0] if channels == 1 else image), (mask * 255).astype(np.uint8)


def write_large_medt_folder(root, counts, height, width, objects=6, seed=0, channels=1):
    """``root/<split>/{img,labelcol}/`` of large sparse images; ``counts = {split: (images, objects or None)}``.

    ``objects`` per split overrides the default (0: all-background images).
    """
    rng = np.random.default_rng(seed)
    for split, (count, split_objects) in counts.items():
        os.makedirs(os.path.join(root, split, "img"), exist_ok=True)
        os.makedirs(os.path.join(root, split, "labelcol"), exist_ok=True)
        for i in range(count):
            n = objects if split_objects is None else split_objects
            image, mask = sparse_example(rng, height, width, n, channels=channels)
            Image.fromarray(image).save(os.path.join(root, split, "img", f"{split}_{i:03d}.png"))
            Image.fromarray(mask).save(os.path.join(root, split, "labelcol", f"{split}_{i:03d}.png"))
    return root
