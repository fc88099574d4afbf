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
