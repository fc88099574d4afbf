"""Training and benchmarking MedT-family models.

The application on top of the ``medt_keras`` library: the training loop
(``medt-train``), ``medt-predict``, ``medt-evaluate`` and ``medt-bench``.
Nothing in ``medt_keras`` imports this package.
"""
