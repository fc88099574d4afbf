"""Training and benchmarking MedT-family models.

``training.benchmark`` is the ``medt-bench`` command; ``training.optimizers``
has the official optimiser (PyTorch's Adam with coupled L2 and frozen
gates). Training with ``model.fit`` on TFDS data is the next work item.
"""
