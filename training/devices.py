"""What JAX runs on, said once at the start of every command, and the ``--require-accelerator`` check."""


class AcceleratorError(RuntimeError):
    """``--require-accelerator`` was given and JAX found only CPUs."""


def platform():
    """``(jax_version, platform, device_count, local_device_count, process_count)`` of JAX's default backend.

    Starts JAX's backend if nothing has yet; in a multi-process run call it
    after ``training.distribution.configure``, whose initialisation must
    come first.
    """
    import jax

    return jax.__version__, jax.default_backend(), jax.device_count(), jax.local_device_count(), jax.process_count()


def describe(program, info=None):
    """One line, e.g. ``medt-train: JAX 0.10.2 on cpu, 1 device``; ``info`` as ``platform()`` returns it."""
    version, name, devices, local, processes = info or platform()
    line = f"{program}: JAX {version} on {name}, {devices} device{'s' if devices != 1 else ''}"
    if processes > 1:
        line += f" ({local} in this process, {processes} processes)"
    return line


def check(program, require_accelerator=False, info=None):
    """Prints ``describe``'s line; raises ``AcceleratorError`` if an accelerator is required and JAX has only CPUs."""
    info = info or platform()
    print(describe(program, info), flush=True)
    if require_accelerator and info[1] == "cpu":
        raise AcceleratorError(
            "--require-accelerator: JAX sees only the CPU. Install JAX for the accelerator "
            '(pip install "medt-keras[cuda12]" for NVIDIA GPUs, "medt-keras[tpu]" on Cloud TPU) '
            "and check that JAX_PLATFORMS does not exclude it."
        )
    return info


def add_argument(parser):
    parser.add_argument(
        "--require-accelerator",
        action="store_true",
        help="stop with an error if JAX finds no GPU or TPU (instead of running on the CPU)",
    )


def prepare_native_kernel(program):
    """Builds the native CPU attention kernel before anything is traced, so no trace waits for a compiler.

    Nothing where the cache has it or this machine cannot run it; says so
    in one line where it compiles, and warns (the JAX kernels then run)
    where the compiler fails. Starts no JAX backend.
    """
    import sys

    from medt_keras.kernels import native_attention

    try:
        native_attention.build(announce=lambda message: print(f"{program}: {message.removeprefix('medt-keras: ')}",
                                                              flush=True))
    except native_attention.BuildError as error:
        print(f"{program}: warning: the native attention kernel could not be built, the JAX kernels run instead: "
              f"{error}", file=sys.stderr)
