"""pytest plugin for scripts/keras_suite.sh: Keras' own callback tests with this library's callbacks.

With ``CKPT_SUITE=ours``, ``keras.callbacks.BackupAndRestore`` (and ``keras.src.callbacks``', which
Keras' tests import) is ``ckpt_callbacks.keras.BackupAndRestore``. It also registers the markers
Keras' root ``conftest.py`` defines, so the test files run outside a Keras checkout, against the
installed ``keras``.
"""

from __future__ import annotations

import os


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_trainable_backend: Keras' marker (a trainable backend)")
    config.addinivalue_line("markers", "multi_device: Keras' marker (several devices)")
    if os.environ.get("CKPT_SUITE") != "ours":
        return
    import keras
    import keras.src.callbacks as src_callbacks

    from ckpt_callbacks.keras import BackupAndRestore

    keras.callbacks.BackupAndRestore = BackupAndRestore
    src_callbacks.BackupAndRestore = BackupAndRestore
