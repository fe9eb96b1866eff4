"""Keras on JAX over several devices (``keras.distribution``), in one process: every shard is saved
as a chunk of its tensor (no gather into one host array, no host copy left cached on the arrays),
and a restore places each device's box on the variable's current layout, whatever layout wrote it.

Fresh processes with ``--xla_force_host_platform_device_count`` (fixed when JAX starts)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from keras_helpers import HERE, run_python

SCRIPT = HERE / "keras_jax_sharded_script.py"
pytest.importorskip("jax")


def _env(devices: int, **extra: str) -> dict:
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def _run(*args, devices=4, check=True, **env):
    return run_python(SCRIPT, *args, backend="jax", env=_env(devices, **env), check=check)


def _variables(npz) -> list[np.ndarray]:
    return [npz[k] for k in sorted((k for k in npz.files if k.startswith("arr_")), key=lambda k: int(k[4:]))]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    out = {}
    for layout in ("model", "data"):
        d = tmp_path_factory.mktemp(f"ref-{layout}")
        _run(d / "ckpt", d / "final.npz", layout)
        out[layout] = (d, np.load(d / "final.npz"))
    return out


@pytest.mark.parametrize("layout", ["model", "data"])
def test_save_writes_shards_as_chunks_and_caches_no_host_copy(references, layout):
    d, ref = references[layout]
    assert not bool(ref["cached"]), "a save left a gathered host copy cached on a variable's array"
    index = json.loads((d / "ckpt" / "ckpt-20.index").read_text())
    kernel = index["tensors"]["model/sequential/dense_in/kernel"]
    if layout == "model":  # split over the 2 devices of the "model" axis: 2 chunks, one per shard
        assert kernel["shape"] == [6, 16]
        assert sorted(c["offsets"] for c in kernel["chunks"]) == [[0, 0], [0, 8]]
        assert all(c["sizes"] == [6, 8] for c in kernel["chunks"])
        assert "P(None, 'model')" in list(ref["specs"])
    else:  # replicated on 4 devices: one replica written, a plain entry
        assert "chunks" not in kernel and kernel["shape"] == [6, 16]


@pytest.mark.parametrize(
    ("layout", "async_save", "resumed_from"),
    [("model", "0", ("ckpt-8",)), ("data", "0", ("ckpt-8",)), ("model", "1", ("ckpt-8", "ckpt-4"))],
)
def test_sigkill_then_rerun_resumes_bit_exactly_on_its_layout(
    references, tmp_path, layout, async_save, resumed_from
):
    _, ref = references[layout]
    args = (tmp_path / "ckpt", tmp_path / "final.npz", layout, 10)
    killed = _run(*args, check=False, ASYNC_SAVE=async_save)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _run(*args, ASYNC_SAVE=async_save)
    got = np.load(tmp_path / "final.npz")
    assert str(got["resumed"]).endswith(resumed_from)
    assert list(got["specs"]) == list(ref["specs"])  # the layout is the distribution's, as before
    assert not bool(got["cached"])
    for a, b in zip(_variables(got), _variables(ref)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


RESTORE_ELSEWHERE = r"""
import sys, jax, keras, numpy as np
from keras import distribution as kd
from ckpt_callbacks.keras import restore, load_model
ckpt, expected, layout = sys.argv[1], np.load(sys.argv[2]), sys.argv[3]
if layout == "data":
    kd.set_distribution(kd.DataParallel(devices=jax.devices(), auto_shard_dataset=False))
elif layout == "model-4":
    mesh = kd.DeviceMesh((1, 4), ("batch", "model"), devices=jax.devices())
    lm = kd.LayoutMap(mesh)
    lm[".*dense_in.*kernel"] = (None, "model")  # 4 chunks, where the checkpoint has 2
    kd.set_distribution(kd.ModelParallel(layout_map=lm, batch_dim_name="batch", auto_shard_dataset=False))
if layout == "load_model":
    model = load_model(ckpt)
else:
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu", name="dense_in"),
                              keras.layers.Dropout(0.25), keras.layers.Dense(2, name="dense_out")])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.optimizer.build(model.trainable_variables)
    restore(model, ckpt)
variables = list(model.variables) + list(model.optimizer.variables)
want = [expected[k] for k in sorted((k for k in expected.files if k.startswith("arr_")), key=lambda k: int(k[4:]))]
assert len(variables) == len(want)
for v, w in zip(variables, want):
    assert np.array_equal(np.asarray(jax.device_get(v.value)), w), v.path
print("devices", len(variables[0].value.sharding.device_set), str(variables[0].value.sharding))
"""


@pytest.mark.parametrize(("devices", "layout"), [(2, "data"), (4, "model-4"), (1, "none"), (1, "load_model")])
def test_restore_on_another_layout_or_device_count(references, devices, layout):
    d, ref = references["model"]  # the final checkpoint of the ModelParallel run is its end state
    proc = run_python(
        RESTORE_ELSEWHERE, d / "ckpt" / "ckpt-20", d / "final.npz", layout, backend="jax", env=_env(devices)
    )
    assert f"devices {devices if layout != 'model-4' else 4}" in proc.stdout


MEMORY = r"""
import sys, tracemalloc, jax, keras, numpy as np
from keras import distribution as kd
from ckpt_callbacks.keras import CheckpointCallback
mesh = kd.DeviceMesh((2, 2), ("batch", "model"), devices=jax.devices())
lm = kd.LayoutMap(mesh)
lm[".*dense.*kernel"] = (None, "model")
kd.set_distribution(kd.ModelParallel(layout_map=lm, batch_dim_name="batch", auto_shard_dataset=False))
model = keras.Sequential([keras.Input((4096,)), keras.layers.Dense(2048, use_bias=False, name="dense")])
model.compile(keras.optimizers.SGD(), "mse")
cb = CheckpointCallback(sys.argv[1])
cb.set_model(model)
cb.on_train_begin()
tracemalloc.start()
cb._save(1, {})
peak = tracemalloc.get_traced_memory()[1]
print("peak", peak, "cached", model.layers[0].kernel.value._npy_value is not None)
"""


def test_host_memory_of_a_save_stays_below_one_shard_plus_write_buffers(tmp_path):
    # A 32 MiB kernel split in two 16 MiB shards: a gather would allocate all 32 MiB on the host.
    proc = run_python(MEMORY, tmp_path / "ckpt", backend="jax", env=_env(4))
    peak = int(proc.stdout.split("peak ")[1].split()[0])
    assert "cached False" in proc.stdout
    assert peak < (16 << 20) + (4 << 20) + (1 << 20), peak  # a shard, the small-write buffer, headroom
