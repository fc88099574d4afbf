"""``medt-predict``: segment images of any size with a trained or converted model.

    medt-predict runs/gated_hela/model.keras frames/ --output predictions/
    medt-predict official_medt.pth image.png --output out/ --probabilities --overlay

The checkpoint is a ``.keras`` model (what ``medt-train`` writes) or an
official PyTorch ``.pth`` state_dict (converted on the fly, no PyTorch
needed). The model says which channel order and normalisation it expects
(``medt_keras.preprocessing``), so no flags are needed; ``--channel-order``
/ ``--normalize`` override it, with a warning when they contradict it.
Images of any size are segmented with overlapping tiles of the model's
size, blended (``medt_keras.inference``). Masks come from the
softmax: argmax, or for two classes ``--threshold`` on the foreground
probability, never the official scripts' threshold on raw logits (which
gives the all-black masks users reported).

Each input gives ``<stem>.png`` (binary: 0/255; more classes: class
indices), and on request ``<stem>_probabilities.npy`` (height, width,
classes) float32 and ``<stem>_overlay.png``. A file that fails is reported
and skipped; the others are still processed; the exit status is 1 if any
failed.
"""

import argparse
import os
import sys
import time

import medt_keras  # noqa: F401  (selects the JAX backend before keras is imported)

import numpy as np

from medt_keras.datasets.images import DatasetError, encode_png, read_image_native
from medt_keras.inference import BLENDS, sliding_window_probabilities
from training import devices
from training.batch_builder import to_model_input
from training.files import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def load_model(path, dtype=None):
    """A ``.keras`` model, or an official ``.pth`` converted on the fly; ``dtype``: a policy to run it in
    (default: as saved, float32 for official checkpoints)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: checkpoint not found.")
    if path.endswith(".keras"):
        return medt_keras.load(path, compile=False, dtype=dtype)
    if path.endswith((".pth", ".pt", ".bin", ".safetensors")):
        return medt_keras.load(path, dtype=dtype)
    raise DatasetError(f"{path}: expected a .keras model or an official .pth / .safetensors checkpoint.")


def collect_inputs(paths):
    """Image files from files and folders (sorted, one level deep); an empty folder is an error."""
    files = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, f) for f in os.listdir(path)
                if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")
            )
            if not found:
                raise DatasetError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder.")
            files += found
        else:
            files.append(path)
    return files


def prepare_image(path, channels, channel_order="bgr", normalize="auto"):
    """Reads ``path`` as the model's input: ``(height, width, channels)`` float32 in [0, 1].

    ``normalize``: ``"dtype"`` divides by the type's maximum (255 for 8-bit,
    as training does); ``"percentile"`` maps the image's 1st / 99.8th
    percentiles to 0 / 1 (the ``hela_nuclei`` preparation, for 16-bit
    microscopy); ``"auto"``: dtype for 8-bit images, percentile otherwise.
    """
    array = read_image_native(path)
    if not np.all(np.isfinite(array)):
        raise DatasetError(f"{path}: the image has NaN or infinite pixel values.")
    if array.shape[-1] != channels:
        raise DatasetError(
            f"{path}: {array.shape[-1]} channel(s), but the model takes {channels}. "
            + ("Convert the image to grayscale." if channels == 1 else "Convert the image to RGB.")
        )
    return np.ascontiguousarray(to_model_input(array, channel_order, normalize))


def resolve_preprocessing(model, channel_order=None, normalize=None):
    """``(channel_order, normalize)`` for ``model``: the arguments where given, else what the model records.

    A model saved by ``medt-train`` or converted from an official checkpoint
    records both (``model.preprocessing``); older files do not, and then
    ``bgr`` / ``auto`` apply. An argument that contradicts the model wins,
    with a warning on stderr.
    """
    recorded = getattr(model, "preprocessing", None) or {}
    resolved = []
    for key, given, fallback in (("channel_order", channel_order, "bgr"), ("normalize", normalize, "auto")):
        saved = recorded.get(key)
        if given is not None and saved is not None and given != saved:
            print(f"medt-predict: warning: --{key.replace('_', '-')} {given} contradicts the model, "
                  f"which expects {saved}; using {given}.", file=sys.stderr, flush=True)
        resolved.append(given if given is not None else saved if saved is not None else fallback)
    return tuple(resolved)


def mask_from_probabilities(probabilities, threshold=None):
    """Class indices ``(height, width)``: argmax, or foreground probability >= ``threshold`` (two classes)."""
    if threshold is None:
        return np.argmax(probabilities, axis=-1).astype(np.uint8)
    if probabilities.shape[-1] != 2:
        raise ValueError("--threshold needs a two-class model; use argmax for more classes.")
    return (probabilities[..., 1] >= threshold).astype(np.uint8)


def write_png(path, array):
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(encode_png(array))


def predict_files(model, files, output, *, channel_order=None, normalize=None, overlap=0.25, batch_size=8,
                  blend="gaussian", threshold=None, probabilities=False, overlay=False, progress=True):
    """Segments each file; returns ``(written stems, {file: error message})``.

    ``channel_order`` / ``normalize``: ``None`` takes the model's own (see ``resolve_preprocessing``).
    The next file is read and the last one's files written in threads while
    the model runs (decoding, PNG encoding and file I/O release the GIL).
    """
    from concurrent.futures import ThreadPoolExecutor

    from training.visualize import overlay as overlay_picture

    channel_order, normalize = resolve_preprocessing(model, channel_order, normalize)

    os.makedirs(output, exist_ok=True)
    channels = int(model.input_shape[-1])
    done, failed = [], {}

    def write(stem, image, probs, mask):
        binary = probs.shape[-1] == 2
        write_png(os.path.join(output, f"{stem}.png"), mask * 255 if binary else mask)
        if probabilities:
            with atomic_path(os.path.join(output, f"{stem}_probabilities.npy")) as temporary:
                with open(temporary, "wb") as handle:
                    np.save(handle, probs)
        if overlay:
            shown = image[..., ::-1] if channels == 3 and channel_order == "bgr" else image
            picture = overlay_picture(shown, np.zeros_like(mask), mask, alpha=0.45)
            write_png(os.path.join(output, f"{stem}_overlay.png"), picture.astype(np.uint8))
        return stem

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        def read(index):
            if index < len(files):
                return reader.submit(prepare_image, files[index], channels, channel_order, normalize)

        upcoming, writes = read(0), []
        for number, path in enumerate(files, 1):
            stem = os.path.splitext(os.path.basename(path))[0]
            reading, upcoming = upcoming, read(number)
            try:
                image = reading.result()
                if progress:
                    print(f"[{number}/{len(files)}] {path} {image.shape[0]}x{image.shape[1]}", flush=True)
                probs = sliding_window_probabilities(model, image, overlap=overlap, batch_size=batch_size,
                                                     blend=blend, progress=progress)
                mask = mask_from_probabilities(probs, threshold)
                writes.append(writer.submit(write, stem, image, probs, mask))
            except (DatasetError, ValueError) as error:
                failed[path] = str(error)
                print(f"medt-predict: error: {error}", file=sys.stderr, flush=True)
        done = [future.result() for future in writes]
    return done, failed


def main(argv=None):
    parser = argparse.ArgumentParser(prog="medt-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help=".keras model or official .pth state_dict")
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--output", "-o", required=True, help="folder for the masks")
    parser.add_argument("--channel-order", choices=("bgr", "rgb"), default=None,
                        help="order the model expects colour channels in (default: the model's own, else bgr)")
    parser.add_argument("--normalize", choices=("auto", "dtype", "percentile"), default=None,
                        help="default: the model's own, else auto")
    parser.add_argument("--overlap", type=float, default=0.25, help="fraction of a tile shared with its neighbour")
    parser.add_argument("--blend", choices=BLENDS, default="gaussian")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=None,
                        help="two classes: foreground probability threshold instead of argmax")
    parser.add_argument("--probabilities", action="store_true", help="also write <stem>_probabilities.npy")
    parser.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
    parser.add_argument("--dtype", default=None,
                        help="dtype policy to run the model in, e.g. mixed_bfloat16 (default: as saved)")
    parser.add_argument("--quiet", action="store_true")
    devices.add_argument(parser)
    args = parser.parse_args(argv)
    started = time.time()
    devices.prepare_native_kernel("medt-predict")
    try:
        devices.check("medt-predict", args.require_accelerator)
        model = load_model(args.checkpoint, dtype=args.dtype)
        files = collect_inputs(args.inputs)
    except (DatasetError, devices.AcceleratorError, ValueError) as error:
        print(f"medt-predict: error: {error}", file=sys.stderr)
        return 2
    done, failed = predict_files(
        model, files, args.output, channel_order=args.channel_order, normalize=args.normalize, overlap=args.overlap,
        batch_size=args.batch_size, blend=args.blend, threshold=args.threshold, probabilities=args.probabilities,
        overlay=args.overlay, progress=not args.quiet,
    )
    print(f"medt-predict: {len(done)} of {len(files)} images segmented into {args.output} "
          f"in {time.time() - started:.1f} s" + (f"; {len(failed)} failed:" if failed else "."))
    for path, message in failed.items():
        print(f"  {message}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
