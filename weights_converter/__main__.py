"""Command line: ``python -m weights_converter SRC.pth DST.keras`` (or DST.weights.h5)."""

import argparse
import math
import os
import sys


def count_official_parameters(model):
    """Parameters as PyTorch counts them: everything but BatchNorm statistics and counters."""
    return sum(
        math.prod(v.shape)
        for v in model.weights
        if not v.path.endswith(("moving_mean", "moving_variance", "num_batches_tracked"))
    )


def _parse_size(text):
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise SystemExit(f"error: --img-size {text!r}: expected N or HxW, e.g. 256 or 256x384")
    return parts[0] if len(parts) == 1 else parts


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m weights_converter",
        description=(
            "Convert an official MedT checkpoint (a PyTorch state_dict .pth, or .safetensors) "
            "into a Keras model (.keras) or weights file (.weights.h5). PyTorch is not needed."
        ),
    )
    parser.add_argument("source", help="official checkpoint: .pth/.pt written by torch.save(state_dict), or .safetensors")
    parser.add_argument("destination", help="output: DST.keras (whole model) or DST.weights.h5 (weights only)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--img-size",
        metavar="SIZE",
        help="build for another input size, N or HxW (needs --resample-positions for positional models)",
    )
    parser.add_argument(
        "--resample-positions",
        action="store_true",
        help="interpolate the relative-position tables to --img-size (an approximation)",
    )
    args = parser.parse_args(argv)

    if not args.destination.endswith((".keras", ".weights.h5")):
        print(
            f"error: {args.destination}: the destination must end in .keras or .weights.h5",
            file=sys.stderr,
        )
        return 2

    from weights_converter.convert import build_model, infer_architecture, load_state_dict_into
    from weights_converter.state_dict_io import CheckpointError, read_state_dict

    try:
        state_dict = read_state_dict(args.source)
        name, hyperparameters = infer_architecture(state_dict, source=args.source)
        print(f"read {args.source}: {len(state_dict)} tensors")
        if args.img_size:
            hyperparameters["img_size"] = _parse_size(args.img_size)
        print(f"architecture: {name}")
        for key, value in hyperparameters.items():
            print(f"  {key} = {value}")
        model = build_model(name, dtype=args.dtype, **hyperparameters)
        load_state_dict_into(
            model, state_dict, source=args.source, resample_positions=args.resample_positions
        )
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # a well-formed file whose tensors fit no model
        print(
            f"error: {args.source}: its state_dict does not describe a model this converter can build "
            f"({type(error).__name__}: {str(error)[:300]})",
            file=sys.stderr,
        )
        return 1
    print(f"Keras model: {type(model).__name__}, {count_official_parameters(model):,} parameters")
    directory = os.path.dirname(os.path.abspath(args.destination))
    os.makedirs(directory, exist_ok=True)
    # Write beside the destination, then rename: a killed run never leaves
    # a half-written file under the destination's name.
    suffix = ".keras" if args.destination.endswith(".keras") else ".weights.h5"
    partial = f"{args.destination[: -len(suffix)]}.partial-{os.getpid()}{suffix}"
    try:
        if suffix == ".keras":
            model.save(partial)
        else:
            model.save_weights(partial)
        os.replace(partial, args.destination)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    print(f"wrote {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
