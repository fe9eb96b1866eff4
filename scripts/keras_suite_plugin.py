"""pytest plugin for scripts/keras_suite.sh: Keras' own callback tests with this library's callbacks.

With ``CKPT_SUITE=ours``, ``keras.callbacks.BackupAndRestore`` (and ``keras.src.callbacks``', which
Keras' tests import) is ``ckpt_callbacks.keras.BackupAndRestore``, and ``ModelCheckpoint`` is an
argument-mapping adapter onto ``CheckpointCallback``: ``filepath``'s directory is the checkpoint
directory; ``monitor``, ``mode``, ``save_best_only``, ``save_freq``, ``initial_value_threshold`` keep
their names; ``save_weights_only`` leaves the optimizer out. It also registers the markers Keras'
root ``conftest.py`` defines, so the test files run outside a Keras checkout, against the installed
``keras``.
"""

from __future__ import annotations

import os


def model_checkpoint_adapter():
    from ckpt_callbacks.keras import CheckpointCallback

    def ModelCheckpoint(  # noqa: N802 - stands in for Keras' class
        filepath,
        monitor="val_loss",
        verbose=0,
        save_best_only=False,
        save_weights_only=False,
        mode="auto",
        save_freq="epoch",
        initial_value_threshold=None,
    ):
        filepath = os.fspath(filepath)
        suffixes = (".weights.h5",) if save_weights_only else (".keras", ".h5")
        if not filepath.endswith(suffixes):  # Keras' own check, so that its error tests run too
            raise ValueError(
                f"The filepath provided must end in {' or '.join(suffixes)}. Received: {filepath}"
            )
        return CheckpointCallback(
            os.path.dirname(filepath) or ".",
            monitor=monitor,
            mode=mode,
            save_best_only=save_best_only,
            save_freq=save_freq,
            initial_value_threshold=initial_value_threshold if save_best_only else None,
            save_optimizer=not save_weights_only,
            save_on_train_end=False,
            max_to_keep=None,
            resume=False,
        )

    return ModelCheckpoint


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_trainable_backend: Keras' marker (a trainable backend)")
    config.addinivalue_line("markers", "multi_device: Keras' marker (several devices)")
    if os.environ.get("CKPT_SUITE") != "ours":
        return
    import keras
    import keras.src.callbacks as src_callbacks

    from ckpt_callbacks.keras import BackupAndRestore

    adapter = model_checkpoint_adapter()
    for module in (keras.callbacks, src_callbacks):
        module.BackupAndRestore = BackupAndRestore
        module.ModelCheckpoint = adapter
