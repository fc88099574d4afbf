import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import medt_keras  # noqa: E402,F401  (JAX backend before keras loads)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
OFFICIAL_TINY = os.path.join(FIXTURES, "official")
OFFICIAL_FULL = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "official", "full")
)
