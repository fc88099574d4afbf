"""``python -m medt_keras.kernels build``: builds the native attention kernel for this CPU ahead of use.

Run it once after installing (the README's install commands do): the
kernel is then loaded from the cache when a model is first traced, instead
of being compiled then. It prints where the library is, or why this
machine runs the JAX kernels instead. Exit status 0 in both cases; 1 where
a compiler was found and failed on the source (its message is printed).
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m medt_keras.kernels", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the native attention kernel for this CPU (cached)")
    build.add_argument("--rebuild", action="store_true", help="compile again even where the cache has it")
    args = parser.parse_args(argv)

    from medt_keras.kernels import native_attention

    try:
        library, reason = native_attention.build(rebuild=args.rebuild)
    except native_attention.BuildError as error:
        print(f"medt-keras: building the native attention kernel failed: {error}", file=sys.stderr)
        return 1
    if library is None:
        print(f"medt-keras: no native attention kernel here ({reason}); the JAX kernels run instead.")
    else:
        print(f"medt-keras: native attention kernel ({native_attention.instruction_set()}) ready: {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
