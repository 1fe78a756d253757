"""pytest set-up for the doctests in docs/*.md (the repository's conftest.py applies too).

The build helpers in _build_support/ import mkdocs and griffe, which only the docs
extra installs; they are not tests.

docs/migration/keras.md runs Keras 3 on its JAX backend, which Keras reads from
KERAS_BACKEND when it is first imported, so it is set here, before any test runs.
"""

import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")
# Keras writes a config file on first import; keep it out of the user's home directory.
os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="jcce-keras-"))

collect_ignore = ["_build_support"]
