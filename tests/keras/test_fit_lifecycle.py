"""CheckpointCallback across the life of ``fit``: unbuilt models, a fit that raises, repeated fits."""

from __future__ import annotations

import json

import pytest
from keras_helpers import BACKENDS, HERE, run_python

UNBUILT = r"""
import json, sys, warnings
import keras, numpy as np
import ckpt_callbacks
from ckpt_callbacks.keras import CheckpointCallback
import keras_models as models

x, y = models.data()
out = {}
for kind in ("subclassed", "sequential_no_input"):
    d = f"{sys.argv[1]}/{kind}"
    res = out[kind] = {}
    # Fresh directory: trains and saves like fit without the callback.
    model = models.unbuilt(kind)
    cb = CheckpointCallback(d, save_on_epoch_end=True, max_to_keep=None)
    h = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[cb], verbose=0)
    res["fresh"] = [h.epoch, cb.restored_from, int(model.optimizer.iterations.numpy())]
    res["saved"] = [p.rsplit("-", 1)[1] for p in ckpt_callbacks.get_checkpoint_state(d).all_model_checkpoint_paths]
    # A checkpoint to resume from, and a model that is still unbuilt when training begins.
    again = models.unbuilt(kind)
    cb = CheckpointCallback(d, save_on_epoch_end=True, max_to_keep=None)
    try:
        h = again.fit(x, y, batch_size=4, epochs=3, shuffle=False, callbacks=[cb], verbose=0)
        res["unbuilt_resume"] = ["ok", h.epoch, cb.restored_from.rsplit("/", 1)[1],
                                 int(again.optimizer.iterations.numpy())]
    except ValueError as e:
        res["unbuilt_resume"] = ["ValueError", str(e)]
    # Built first: resumes on every backend, and the callback that refused is usable again.
    built = models.unbuilt(kind)
    built(x[:1])
    h = built.fit(x, y, batch_size=4, epochs=4, shuffle=False, callbacks=[cb], verbose=0)
    res["built_resume"] = [h.epoch, cb.restored_from.rsplit("/", 1)[1], int(built.optimizer.iterations.numpy())]
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbuilt_model_trains_fresh_and_resume_needs_a_built_model(tmp_path, backend):
    out = json.loads(run_python(UNBUILT, tmp_path, HERE, backend=backend).stdout.strip().splitlines()[-1])
    for kind, res in out.items():
        assert res["fresh"] == [[0, 1], None, 20], kind
        assert res["saved"] == ["10", "20"], kind
        if backend in ("torch", "jax"):
            # Keras' PyTorch and JAX trainers build the model from the first batch before on_train_begin.
            assert res["unbuilt_resume"] == ["ok", [2], "ckpt-20", 30], kind
            assert res["built_resume"] == [[3], "ckpt-30", 40], kind
        else:
            # TensorFlow builds it only when the first train step is traced: too late to restore into.
            status, message = res["unbuilt_resume"]
            assert status == "ValueError", kind
            assert "ckpt-20" in message and "not built" in message, message
            assert "model.build(" in message and "keras.Input" in message, message
            assert res["built_resume"] == [[2, 3], "ckpt-20", 40], kind


AFTER_A_FAILED_FIT = r"""
import json, os, sys, warnings
import keras, numpy as np
import ckpt_callbacks
from ckpt_callbacks.keras import CheckpointCallback
import keras_models as models

warnings.simplefilter("ignore")  # the mid-epoch resume below warns about ResumableDataset
d = sys.argv[1]
x, y = models.data()


class Boom(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == 6:
            raise RuntimeError("boom")


def steps():
    state = ckpt_callbacks.get_checkpoint_state(d)
    listed = [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]
    on_disk = sorted(int(f[5:-6]) for f in os.listdir(d) if f.startswith("ckpt-") and f.endswith(".index"))
    return listed, on_disk


out = {}
cb = CheckpointCallback(d, save_every_n_steps=2)
try:
    models.sequential().fit(x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[cb, Boom()], verbose=0)
except RuntimeError:
    out["failed"] = steps()
# Another callback continues the run in this process (resumes at step 6, ends at 26).
other = CheckpointCallback(d, save_every_n_steps=2)
models.sequential().fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[other], verbose=0)
out["other"] = [os.path.basename(other.restored_from), steps()]
# The callback of the failed fit, used again: resumes from what is on storage now.
model = models.sequential()
h = model.fit(x, y, batch_size=4, epochs=3, shuffle=False, callbacks=[cb], verbose=0)
out["reused"] = [os.path.basename(cb.restored_from or ""), h.epoch, int(model.optimizer.iterations.numpy()),
                 steps()]
fresh = CheckpointCallback(d)
models.sequential().fit(x, y, batch_size=4, epochs=3, shuffle=False, callbacks=[fresh], verbose=0)
out["fresh"] = os.path.basename(fresh.restored_from or "")
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_callback_reused_after_a_failed_fit_resumes_from_storage(tmp_path, backend):
    out = json.loads(
        run_python(AFTER_A_FAILED_FIT, tmp_path, HERE, backend=backend).stdout.strip().splitlines()[-1]
    )
    assert out["failed"] == [[2, 4, 6], [2, 4, 6]]
    assert out["other"] == ["ckpt-6", [[18, 20, 22, 24, 26], [18, 20, 22, 24, 26]]]
    assert out["reused"] == ["ckpt-26", [2], 36, [[28, 30, 32, 34, 36], [28, 30, 32, 34, 36]]]
    assert out["fresh"] == "ckpt-36"


FIT_TWICE = r"""
import json, sys, warnings
import keras, numpy as np
from ckpt_callbacks.keras import CheckpointCallback
import keras_models as models

x, y = models.data()
model = models.sequential()
cb = CheckpointCallback(sys.argv[1], save_on_epoch_end=True, max_to_keep=None)
out = []
for epochs in (2, 2, 4):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, callbacks=[cb], verbose=0)
    out.append([h.epoch, int(model.optimizer.iterations.numpy()),
                [str(w.message) for w in caught if "CheckpointCallback" in str(w.message)]])
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_resuming_at_or_past_the_requested_epochs_warns_that_nothing_is_trained(tmp_path, backend):
    first, second, third = json.loads(
        run_python(FIT_TWICE, tmp_path, HERE, backend=backend).stdout.strip().splitlines()[-1]
    )
    assert first == [[0, 1], 20, []]
    # The same callback resumes at epoch 2 of fit(epochs=2): nothing to train, and it says so.
    epochs, step, messages = second
    assert (epochs, step, len(messages)) == ([], 20, 1)
    assert "ckpt-20" in messages[0] and "epoch 2" in messages[0] and "epochs=2" in messages[0]
    assert "trains nothing" in messages[0] and "resume=False" in messages[0]
    assert third == [[2, 3], 40, []]
