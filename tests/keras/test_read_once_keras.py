"""The Keras resume (``CheckpointCallback`` at train begin), ``restore(model, directory)`` and
``load_model(directory)`` read the index once and each data file once: in place on the PyTorch backend, load + assign on TensorFlow.
Reads of the real files are counted in a fresh process per backend (``storage_reads``)."""

from __future__ import annotations

import json

import pytest
from keras_helpers import HERE, run_python

SCRIPT = r"""
import json, sys, keras
import keras_models as models
from storage_reads import count_reads
from ckpt_callbacks.keras import CheckpointCallback, load_model, restore

directory = sys.argv[1]
keras.utils.set_random_seed(3)
x, y = models.data()
trained = models.sequential()
trained.fit(x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[CheckpointCallback(directory)], verbose=0)
reads = count_reads(setattr)
out = {}

class Probe(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        out["resume"] = dict(reads.counts)

resumed = models.sequential()
resumed.optimizer.build(resumed.trainable_variables)
cb = CheckpointCallback(directory)
reads.reset()
resumed.fit(x, y, batch_size=4, epochs=1, initial_epoch=0, shuffle=False, callbacks=[cb, Probe()], verbose=0, steps_per_epoch=1)
out["restored_from"] = cb.restored_from
fresh = models.sequential()
fresh.optimizer.build(fresh.trainable_variables)
reads.reset()
restore(fresh, directory)
out["restore"] = dict(reads.counts)
reads.reset()
load_model(directory)
out["load_model"] = dict(reads.counts)
print("RESULT" + json.dumps(out))
"""


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_keras_resume_and_restore_read_each_file_once(backend, tmp_path):
    proc = run_python(SCRIPT, tmp_path / "run", HERE, backend=backend)
    out = json.loads(proc.stdout.rsplit("RESULT", 1)[1])
    assert out["restored_from"]
    for what in ("resume", "restore", "load_model"):
        counts = out[what]
        assert any(n.endswith(".index") for n in counts), (what, counts)
        assert any(".data-" in n for n in counts), (what, counts)
        assert all(c == 1 for c in counts.values()), (what, counts)
