"""Lightning checkpoint dict <-> core tree: every Lightning container round-trips, without pickle."""

from __future__ import annotations

import argparse
import collections
import enum
import pathlib
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.utilities.parsing import AttributeDict

from ckpt_callbacks import load_checkpoint, save_checkpoint
from ckpt_callbacks.errors import CorruptCheckpointError
from ckpt_callbacks.lightning import _convert, _rng
from ckpt_callbacks.lightning._convert import RESERVED_KEY, from_tree, to_tree


class Color(enum.Enum):
    RED = "red"


class Pair(NamedTuple):
    a: int
    b: float


class Opaque:
    pass


def roundtrip(checkpoint, tmp_path, name="ckpt-1"):
    save_checkpoint(tmp_path / name, to_tree(checkpoint))
    return from_tree(load_checkpoint(tmp_path / name))


ALL_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_tensors_of_every_dtype_round_trip_bit_identical(tmp_path, dtype):
    src = (torch.randn(3, 5) * 7).to(dtype) if dtype != torch.bool else torch.rand(3, 5) > 0.5
    out = roundtrip({"state_dict": collections.OrderedDict(w=src, scalar=src[0, 0].clone())}, tmp_path)
    w = out["state_dict"]["w"]
    assert isinstance(w, torch.Tensor) and w.dtype == dtype and w.shape == src.shape
    assert torch.equal(w.view(torch.uint8), src.contiguous().view(torch.uint8))
    assert out["state_dict"]["scalar"].shape == ()


def test_module_state_dict_keeps_ordereddict_and_metadata(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    sd = module.state_dict()
    out = roundtrip({"state_dict": sd}, tmp_path)["state_dict"]
    assert type(out) is collections.OrderedDict and list(out) == list(sd)
    assert out._metadata == sd._metadata
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    fresh.load_state_dict(out)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values(), strict=True))


def test_optimizer_state_int_keys_and_tuples_in_param_groups(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10)
    ckpt = {"optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()]}
    out = roundtrip(ckpt, tmp_path)
    state = out["optimizer_states"][0]
    assert list(state["state"]) == [0, 1]
    assert state["param_groups"][0]["betas"] == ckpt["optimizer_states"][0]["param_groups"][0]["betas"]
    assert isinstance(state["param_groups"][0]["betas"], tuple)
    assert state["state"][0]["step"].dtype == torch.float32
    fresh_opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh_opt.load_state_dict(state)
    fresh_sched = torch.optim.lr_scheduler.OneCycleLR(fresh_opt, max_lr=0.5, total_steps=10)
    fresh_sched.load_state_dict(out["lr_schedulers"][0])
    assert fresh_sched.state_dict() == sched.state_dict()


def test_lightning_containers_round_trip(tmp_path):
    hparams = AttributeDict(
        lr=0.1,
        sizes=torch.Size([3, 4]),
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
        data_dir=pathlib.Path("/data/x"),
        color=Color.RED,
        pair=Pair(1, 2.5),
        tags={"b", "a"},
        frozen=frozenset({1}),
        args=argparse.Namespace(depth=3, name="n"),
        nested=AttributeDict(inner=[1, (2, 3)]),
        cls=torch.nn.Linear,
        np_scalar=np.float32(1.5),
        none=None,
    )
    ckpt = {
        "hyper_parameters": hparams,
        "hparams_name": "kwargs",
        "callbacks": {torch.nn.Linear: {"x": 1}, "EarlyStopping{'monitor': 'val_loss'}": {"wait_count": 2}},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1}}}},
        "MixedPrecision": {"scale": 65536.0, "_growth_tracker": 3},
    }
    out = roundtrip(ckpt, tmp_path)
    hp = out["hyper_parameters"]
    assert type(hp) is AttributeDict and hp.lr == 0.1
    assert type(hp.sizes) is torch.Size and hp.sizes == torch.Size([3, 4])
    assert hp.dtype is torch.bfloat16 and hp.device == torch.device("cpu")
    assert hp.data_dir == pathlib.Path("/data/x") and hp.color is Color.RED
    assert type(hp.pair) is Pair and hp.pair == Pair(1, 2.5)
    assert hp.tags == {"a", "b"} and hp.frozen == frozenset({1}) and isinstance(hp.frozen, frozenset)
    assert isinstance(hp.args, argparse.Namespace) and hp.args.depth == 3
    assert type(hp.nested) is AttributeDict and hp.nested.inner == [1, (2, 3)]
    assert hp.cls is torch.nn.Linear
    assert type(hp.np_scalar) is np.float32 and hp.np_scalar == 1.5
    assert list(out["callbacks"]) == [torch.nn.Linear, "EarlyStopping{'monitor': 'val_loss'}"]
    assert out["MixedPrecision"] == ckpt["MixedPrecision"] and out["loops"] == ckpt["loops"]
    assert RESERVED_KEY not in out


def test_unencodable_leaf_names_key_path_and_pickle_hint(tmp_path):
    ckpt = {"callbacks": {"cfg": Opaque()}}
    with pytest.raises(TypeError, match=r"state\['callbacks'\]\['cfg'\].*allow_pickle=True"):
        save_checkpoint(tmp_path / "ckpt-1", to_tree(ckpt))


def test_unencodable_hparams_are_dropped_and_recorded(tmp_path):
    ckpt = {"hyper_parameters": {"cfg": Opaque(), "items": [1, Opaque()], "lr": 0.1}}
    with pytest.warns(UserWarning, match=r"state\['hyper_parameters'\]\['cfg'\].*ignore=.*allow_pickle=True"):
        tree = to_tree(ckpt)
    save_checkpoint(tmp_path / "ckpt-1", tree)
    dropped: list = []
    out = from_tree(load_checkpoint(tmp_path / "ckpt-1"), dropped=dropped)
    assert out["hyper_parameters"] == {"items": [1, None], "lr": 0.1}
    assert [p for p, _ in dropped] == [
        "state['hyper_parameters']['cfg']",
        "state['hyper_parameters']['items'][1]",
    ]
    kept = to_tree(ckpt, allow_pickle=True)["hyper_parameters"]["cfg"]  # with pickle: stored as is
    assert isinstance(kept, Opaque)


def test_allow_pickle_stores_unknown_leaves_both_sides(tmp_path):
    ckpt = {"hyper_parameters": {"cfg": pathlib.PurePosixPath("a"), "fn": collections.Counter(a=1)}}
    save_checkpoint(tmp_path / "ckpt-1", to_tree({"x": Opaque}), allow_pickle=False)  # a class: no pickle
    save_checkpoint(tmp_path / "ckpt-2", to_tree(ckpt), allow_pickle=True)
    out = from_tree(load_checkpoint(tmp_path / "ckpt-2", allow_pickle=True))
    assert out["hyper_parameters"]["fn"] == collections.Counter(a=1)


def test_classes_are_resolved_without_importing(tmp_path):
    tree = to_tree({"hyper_parameters_type": Opaque})
    tree["hyper_parameters_type"] = "some_module_that_does_not_exist:Config"
    with pytest.warns(UserWarning, match="not imported"):
        out = from_tree(tree)
    assert out["hyper_parameters_type"] == "some_module_that_does_not_exist:Config"
    assert "some_module_that_does_not_exist" not in sys.modules


def test_reserved_key_is_refused():
    with pytest.raises(ValueError, match=RESERVED_KEY):
        to_tree({RESERVED_KEY: 1})


@pytest.mark.parametrize(
    "table",
    [[[["missing"], "AttributeDict", None]], [[["a"], "no-such-tag", None]], "not a list", [[1, 2]]],
)
def test_corrupt_type_table_is_rejected(table):
    with pytest.raises(CorruptCheckpointError):
        from_tree({"a": {"b": 1}, RESERVED_KEY: {"version": 1, "types": table}})


def test_plain_core_checkpoint_loads_as_is():
    assert from_tree({"a": 1}) == {"a": 1}


def test_rng_capture_and_restore_reproduce_all_generators():
    import random

    state = _rng.capture()
    first = (torch.rand(3), np.random.rand(3), random.random())
    _rng.restore(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_rng_state_is_storable_without_pickle(tmp_path):
    state = _rng.capture()
    save_checkpoint(tmp_path / "ckpt-1", {"rng": state})
    torch.rand(5)
    _rng.restore(load_checkpoint(tmp_path / "ckpt-1")["rng"])
    expected = torch.rand(2)
    _rng.restore(state)
    assert torch.equal(torch.rand(2), expected)


def test_rng_state_of_older_checkpoints_still_restores(tmp_path):
    import random

    # The layout lightning/_rng.capture stored before the Python / NumPy part moved to the core.
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    old = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    save_checkpoint(tmp_path / "ckpt-1", {"rng": old})
    expected = (torch.rand(2), np.random.rand(2), random.random())
    _rng.restore(load_checkpoint(tmp_path / "ckpt-1")["rng"])
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_rng_state_passes_torch_load_weights_only(tmp_path):
    torch.save(_rng.capture(), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert isinstance(state["python"]["state"], torch.Tensor)


def test_import_ckpt_callbacks_stays_framework_free():
    code = "import sys, ckpt_callbacks; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_class_path_round_trip():
    assert _convert.resolve_class(_convert.class_path(AttributeDict)) is AttributeDict
    assert _convert.resolve_class("os:path.<locals>") is None


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.builds(lambda xs: torch.tensor(xs, dtype=torch.bfloat16), st.lists(st.floats(-1e3, 1e3), max_size=4)),
    st.sampled_from([torch.float16, torch.int8]),
    st.builds(lambda xs: torch.Size(xs), st.lists(st.integers(0, 9), max_size=3)),
)
_keys = st.one_of(st.text(max_size=6), st.integers(-5, 50))
_trees = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.tuples(children, children),
        st.dictionaries(_keys, children, max_size=3),
        st.dictionaries(st.text(min_size=1, max_size=6), children, max_size=3).map(AttributeDict),
        st.builds(
            lambda d: collections.OrderedDict(d), st.dictionaries(st.text(max_size=4), children, max_size=3)
        ),
        st.sets(st.integers(0, 9), max_size=3),
    ),
    max_leaves=12,
)


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@settings(max_examples=60, deadline=None)
@given(tree=_trees)
def test_any_lightning_like_tree_round_trips_in_memory(tree):
    """to_tree -> core encode/decode (no I/O) -> from_tree gives the same types and values."""
    from ckpt_callbacks._format import _format

    checkpoint = {"x": tree}
    encoded = _format.encode_tree(to_tree(checkpoint))
    tensors = {t.name: _to_loaded(t) for t in encoded.tensors}
    out = from_tree(_format.decode_tree(encoded.tree, tensors))
    assert _same(out, checkpoint)


def _to_loaded(entry):
    from ckpt_callbacks._format import _torch

    arr = entry.array().copy()
    return _torch.from_numpy(arr) if entry.kind == "torch" else arr
