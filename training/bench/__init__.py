"""``medt-bench``: how fast the models train and infer, against the official PyTorch code too.

One module per concern, each small enough to read at once:

* ``cli``: the command line (subcommands; the old flag forms mapped onto them).
* ``model_table``: ``medt-bench models``, each model measured in fresh processes.
* ``comparison``: ``medt-bench compare``, ours against the official code at its fastest.
* ``op_profile``: ``medt-bench profile``, FLOPs against the peak and an op-by-op profile.
* ``sliding_window``, ``loader``: ``medt-bench sliding-window`` and ``medt-bench loader``.
* ``accelerator_suite``: ``medt-bench suite accelerator``, one budgeted run on a device.
* ``ours``: our Keras models as measured (building, inputs, FLOP counting, the timer).
* ``official``: the official PyTorch code (importing a checkout, its steps, its timer).
* ``allocators``: the host allocators a comparison runs under.
* ``worker``: measurements in processes of their own (child and worker protocols).
* ``timing``: clocks and gauges (median steps, resident memory, matmul peak, load).
* ``tables``, ``records``: what is printed and what is written as JSON.

``medt-bench compile-for`` is ``training.compile_for``. Nothing here imports JAX,
Keras or PyTorch at module level: the parent process never starts JAX, and a
process timing the official code never carries it.
"""
