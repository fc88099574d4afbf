"""Training and benchmarking MedT-family models.

``training.benchmark`` is the ``medt-bench`` command. Training with
``model.fit`` on TFDS data (the official recipe) is the next work item.
"""
