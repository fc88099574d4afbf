"""``medt-bench``: the benchmark's command line, one subcommand per kind of measurement.

Subcommands (``medt-bench SUBCOMMAND --help`` for each one's options)::

    medt-bench models          our models' speed, compile time, memory and FLOPs (+ --official PATH: the
                               official code once per model beside them)
    medt-bench compare         ours against the official code at its fastest (--official PATH): allocators and
                               PyTorch settings searched, then interleaved runs, then an op profile
    medt-bench profile         a step's FLOPs against the matmul peak and where its time goes, op by op
    medt-bench sliding-window  sliding-window prediction against bare inference of as many tiles
    medt-bench loader          the input pipeline alone, against the training rate
    medt-bench suite accelerator   parity, speed and memory on the present device, in one budgeted run
    medt-bench compile-for TARGET  medt-train's programs compiled for a TPU slice without one

The flag forms of earlier versions still work and mean the same
(``translate_legacy``): ``medt-bench --models medt`` is ``models``,
``--official PATH`` is ``compare`` (with ``--separate``: ``models``),
``--sliding-window``, ``--loader``, ``--suite accelerator`` and
``--compile-for TARGET`` their subcommands.
"""

import argparse
import sys

from training.bench import (accelerator_suite, comparison, loader, model_table, op_profile, sliding_window,
                            worker)

# name -> (module with add_arguments(parser) and run(args), one line of help)
SUBCOMMANDS = {
    "models": (model_table, "our models' training and inference speed, compile time, memory and FLOPs, each "
                            "in fresh processes (with --official PATH: the official code beside them)"),
    "compare": (comparison, "ours against the official PyTorch code at its fastest: allocators and PyTorch "
                            "settings searched, then both sides timed in interleaved runs"),
    "profile": (op_profile, "a training step's (or inference batch's) FLOPs against the matmul peak, and "
                            "where its time goes, op by op"),
    "sliding-window": (sliding_window, "sliding-window prediction (HeLa test frames, a synthetic image) against "
                                       "bare inference of as many tiles"),
    "loader": (loader, "the input pipeline alone (threads and grain loaders) against the training rate"),
}
SUITES = {"accelerator": (accelerator_suite, "parity, speed and memory on the present device, in one budgeted run")}
COMPILE_FOR_HELP = ("compile medt-train's programs for a TPU slice without one, e.g. tpu:v5e:2x2, and report the "
                    "compiler's memory, FLOPs, bytes and collectives (needs medt-keras[aot] and JAX_PLATFORMS=cpu; "
                    "medt-bench compile-for TARGET --help)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="medt-bench", description="Training and inference speed, compile time, memory and FLOPs.",
        epilog="The old flag forms still work: medt-bench --models ... (models), --official PATH (compare; with "
               "--separate: models), --sliding-window, --loader, --suite accelerator, --compile-for TARGET.")
    subparsers = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0].replace("``", ""))
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    suite = subparsers.add_parser("suite", help="a budgeted suite of measurements (accelerator)")
    suites = suite.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, (module, help_text) in SUITES.items():
        sub = suites.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    compile_for = subparsers.add_parser("compile-for", help=COMPILE_FOR_HELP, add_help=False)
    compile_for.add_argument("target", help="e.g. tpu:v5e:2x2")
    compile_for.add_argument("options", nargs=argparse.REMAINDER, help="medt-bench compile-for TARGET --help")
    return parser


def _pop(argv, flag, takes_value):
    """Removes ``flag`` (and its value, also as ``flag=value``) from ``argv``; its value, True, or None if absent."""
    for i, arg in enumerate(argv):
        if arg == flag:
            value = argv[i + 1] if takes_value and i + 1 < len(argv) else True
            del argv[i:i + 1 + (takes_value and i + 1 < len(argv))]
            return value
        if takes_value and arg.startswith(flag + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def translate_legacy(argv):
    """The subcommand form of ``argv``: old flag forms mapped to their subcommands, new forms as they are.

    ``--compile-for TARGET`` -> ``compile-for TARGET``; ``--suite accelerator``
    -> ``suite accelerator`` (``--suite models`` -> ``models``);
    ``--sliding-window`` -> ``sliding-window``; ``--loader`` -> ``loader``;
    ``--official PATH`` -> ``compare --official PATH``, but with ``--separate``
    -> ``models --official PATH --separate``; anything else (``--models ...``,
    nothing at all) -> ``models``. The options keep their old names (the
    subcommands accept them as aliases).
    """
    argv = list(argv)
    if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("suite", "compile-for", "-h", "--help")):
        return argv
    target = _pop(argv, "--compile-for", True)
    suite = _pop(argv, "--suite", True)
    if target is not None:  # (True: given without its TARGET, which compile-for then asks for)
        return ["compile-for", *([] if target is True else [target]), *argv]
    if suite == "accelerator":
        return ["suite", "accelerator", *argv]
    if suite not in (None, "models"):
        return ["suite", suite, *argv]  # unknown: argparse names the choices
    if _pop(argv, "--sliding-window", False):
        return ["sliding-window", *argv]
    if _pop(argv, "--loader", False):
        return ["loader", *argv]
    official = any(arg == "--official" or arg.startswith("--official=") for arg in argv)
    if official and "--separate" not in argv:
        return ["compare", *argv]
    return ["models", *argv]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--child"], ["--worker"]) and len(argv) == 2:  # the old internal protocol
        return worker.main(["child" if argv[0] == "--child" else "serve", argv[1]])
    translated = translate_legacy(argv)
    if translated[:1] == ["compile-for"]:  # its own command line, help included
        from training.compile_for import main as compile_for_main

        return compile_for_main(translated[1:])
    args = build_parser().parse_args(translated)
    args.command = " ".join(["medt-bench", *argv])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
