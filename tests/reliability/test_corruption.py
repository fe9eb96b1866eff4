"""Corruption: every flipped byte, truncation and extension is detected.

Every byte of every file of a checkpoint is flipped in turn (data file: length prefix, safetensors
JSON header, padding, every tensor's bytes; ``.meta``; ``.index`` including its own checksum), and
each file is truncated and extended. ``load_checkpoint`` must raise CorruptCheckpointError every time
(never another exception, never a silently different state), ``restore()`` must fall back to the
newest valid checkpoint with a warning, and ``ckpt-callbacks verify`` must exit 1 naming the file.
"""

from __future__ import annotations

import json
import os
import random
import struct
import warnings

import pytest
import rel_workload as wl

from ckpt_callbacks import CheckpointManager, CorruptCheckpointError, load_checkpoint
from ckpt_callbacks._api._resolve import read_index

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def run(tmp_path):
    d = str(tmp_path / "run")
    box = [1]
    mgr = CheckpointManager(d, max_to_keep=5, clock=lambda: wl.clock_for(box[0]))
    for s in (3, 4, 5):
        box[0] = s
        mgr.save(wl.state_for(s), step=s)
    mgr.close()
    return d


def _regions(directory: str, name: str) -> dict[str, list[tuple[str, int, int]]]:
    """file -> [(region, start, end)] covering every byte of the file (of an earlier data file the
    checkpoint points into: its header and the tensors the checkpoint reads there)."""
    index = read_index(os.path.join(directory, name))
    out: dict[str, list[tuple[str, int, int]]] = {}
    for file_no, f in enumerate(index["files"]):  # an incremental checkpoint's earlier data file too
        size = os.path.getsize(os.path.join(directory, f["name"]))
        if f["kind"] == "meta":
            out[f["name"]] = [("meta", 0, size)]
            continue
        with open(os.path.join(directory, f["name"]), "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = fh.read(n)
        json_len = len(header.rstrip(b" "))
        regions = [("length prefix", 0, 8), ("safetensors header", 8, 8 + json_len)]
        if json_len < n:
            regions.append(("header padding", 8 + json_len, 8 + n))
        own = [(tname, t) for tname, t in index["tensors"].items() if t["file"] == file_no]
        for tname, t in sorted(own, key=lambda kv: kv[1]["offset"]):
            regions.append((f"tensor {tname}", t["offset"], t["offset"] + t["length"]))
        out[f["name"]] = regions
    idx_name = name + ".index"
    size = os.path.getsize(os.path.join(directory, idx_name))
    with open(os.path.join(directory, idx_name), "rb") as fh:
        tail = fh.read().rindex(b',"index_checksum"')
    out[idx_name] = [("index body", 0, tail), ("index checksum", tail, size)]
    for fname, regions in out.items():  # the regions tile each file of its own exactly
        if not fname.startswith(name + "."):
            continue
        assert regions[0][1] == 0 and regions[-1][2] == os.path.getsize(os.path.join(directory, fname))
        assert all(a[2] == b[1] for a, b in zip(regions, regions[1:])), fname
    return out


def _flip(path: str, pos: int, mask: int) -> bytes:
    with open(path, "r+b") as f:
        f.seek(pos)
        old = f.read(1)
        f.seek(pos)
        f.write(bytes([old[0] ^ mask]))
    return old


def _put(path: str, pos: int, byte: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(byte)


def test_every_single_byte_flip_is_detected(run):
    name, ckpt = "ckpt-5", os.path.join(run, "ckpt-5")
    rng = random.Random(0)
    flips = 0
    regions_seen = set()
    for fname, regions in _regions(run, name).items():
        path = os.path.join(run, fname)
        for region, start, end in regions:
            for pos in range(start, end):
                mask = (
                    1 << rng.randrange(8) if pos % 2 else rng.randrange(1, 256)
                )  # bit flips and byte changes
                old = _flip(path, pos, mask)
                try:
                    with pytest.raises(CorruptCheckpointError):
                        load_checkpoint(ckpt)
                except BaseException as e:
                    raise AssertionError(
                        f"flip of {fname} byte {pos} ({region}) mask {mask:#x}: {e!r}"
                    ) from e
                finally:
                    _put(path, pos, old)
                flips += 1
                regions_seen.add(region.split()[0])
    wl.assert_same_tree(load_checkpoint(ckpt), wl.state_for(5))  # restored bytes: valid again
    assert {"length", "safetensors", "tensor", "meta", "index"} <= regions_seen
    print(f"single-byte flips detected: {flips}")


@pytest.mark.parametrize("kind", ["data", "meta", "index"])
def test_truncation_and_extension_are_detected(run, kind):
    ckpt = os.path.join(run, "ckpt-5")
    fname = {"data": "ckpt-5.data-00000-of-00001", "meta": "ckpt-5.meta", "index": "ckpt-5.index"}[kind]
    path = os.path.join(run, fname)
    with open(path, "rb") as f:
        original = f.read()
    n = len(original)
    variants = [original[:k] for k in sorted({0, 1, 7, 8, 9, n // 3, n // 2, n - 8, n - 1})]
    variants += [original + b"\0", original + b"\n", original + b" " * 4096, original + original]
    for data in variants:
        with open(path, "wb") as f:
            f.write(data)
        with pytest.raises(CorruptCheckpointError):
            load_checkpoint(ckpt)
    with open(path, "wb") as f:
        f.write(original)
    wl.assert_same_tree(load_checkpoint(ckpt), wl.state_for(5))


def test_missing_data_or_meta_file_is_corrupt(run):
    for fname in ("ckpt-5.data-00000-of-00001", "ckpt-5.meta"):
        path = os.path.join(run, fname)
        os.rename(path, path + ".away")
        with pytest.raises(CorruptCheckpointError):
            load_checkpoint(os.path.join(run, "ckpt-5"))
        os.rename(path + ".away", path)


@pytest.mark.parametrize(
    "region",
    [
        "length prefix",
        "safetensors header",
        "tensor",
        "meta",
        "index body",
        "index checksum",
        "truncated",
        "extended",
        "missing data",
    ],
)
def test_restore_falls_back_to_the_newest_valid_checkpoint_with_a_warning(run, region):
    def damage(name):
        regions = _regions(run, name)
        if region == "truncated":
            p = os.path.join(run, f"{name}.data-00000-of-00001")
            os.truncate(p, os.path.getsize(p) - 1)
            return
        if region == "extended":
            with open(os.path.join(run, f"{name}.meta"), "ab") as f:
                f.write(b" ")
            return
        if region == "missing data":
            os.remove(os.path.join(run, f"{name}.data-00000-of-00001"))
            return
        for fname, regs in regions.items():
            for r, start, end in regs:
                if r.startswith(region):
                    _flip(os.path.join(run, fname), (start + end) // 2, 0x10)
                    return
        raise AssertionError(region)

    damage("ckpt-5")
    mgr = CheckpointManager(run, max_to_keep=5)
    with pytest.warns(UserWarning, match="ckpt-5"):
        path, state = mgr.restore_with_path()
    assert path.endswith("ckpt-4")
    wl.assert_same_tree(state, wl.state_for(4))
    with pytest.warns(UserWarning, match="ckpt-5"):
        wl.assert_same_tree(mgr.restore(), wl.state_for(4))
    with pytest.raises(CorruptCheckpointError):
        mgr.restore(os.path.join(run, "ckpt-5"))
    damage("ckpt-4")
    with pytest.warns(UserWarning) as record:
        wl.assert_same_tree(mgr.restore(), wl.state_for(3))
    assert {m for w in record for m in ("ckpt-5", "ckpt-4") if m in str(w.message)} == {"ckpt-5", "ckpt-4"}
    damage("ckpt-3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mgr.restore() is None
    mgr.close()


def test_cli_verify_names_the_corrupt_file_and_tensor(run, capsys):
    from ckpt_callbacks._cli._main import main  # the CLI ships with the package: a broken import must fail

    assert main(["verify", run]) == 0
    checked = 0
    for fname, regions in _regions(run, "ckpt-5").items():
        path = os.path.join(run, fname)
        for region, start, end in regions:
            for pos in sorted({start, (start + end) // 2, end - 1}):
                old = _flip(path, pos, 0x01)
                try:
                    capsys.readouterr()
                    code = main(["verify", run])
                    out = capsys.readouterr()
                    text = out.out + out.err
                    assert code == 1, (fname, region, pos, text)
                    assert "ckpt-5" in text, text
                    if region.startswith("tensor"):
                        assert region.split(" ", 1)[1] in text, (region, text)
                    code_one = main(["verify", os.path.join(run, "ckpt-5")])
                    capsys.readouterr()
                    assert code_one == 1
                    if fname.startswith("ckpt-5."):  # ckpt-4 points into the same earlier data file
                        assert main(["verify", os.path.join(run, "ckpt-4")]) == 0
                    capsys.readouterr()
                finally:
                    _put(path, pos, old)
                checked += 1
    assert main(["verify", run]) == 0
    print(f"CLI verify corruptions detected: {checked}")


def test_corrupt_state_file_is_reported_not_guessed(run):
    """A state file that does not parse is CorruptCheckpointError, for readers and for a new manager."""
    from ckpt_callbacks import get_checkpoint_state, latest_checkpoint

    path = os.path.join(run, "checkpoint")
    with open(path, "rb") as f:
        good = f.read()
    for bad in [
        b"\xff\xfe garbage",
        b"model_checkpoint_path: ckpt-5\n",
        b'unknown_field: "x"\n',
        good.replace(b"all_model_checkpoint_timestamps: ", b"all_model_checkpoint_timestamps: x"),
    ]:
        with open(path, "wb") as f:
            f.write(bad)
        for call in (
            lambda: get_checkpoint_state(run),
            lambda: latest_checkpoint(run),
            lambda: CheckpointManager(run),
        ):
            with pytest.raises(CorruptCheckpointError):
                call()
    # the retention comment line is only trusted when it agrees with the TF fields
    comment = [ln for ln in good.splitlines() if ln.startswith(b"# ckpt_callbacks:")][0]
    doc = json.loads(comment.split(b": ", 1)[1])
    doc["checkpoints"][0]["name"] = "ckpt-999"
    with open(path, "wb") as f:
        f.write(good.replace(comment, b"# ckpt_callbacks: " + json.dumps(doc).encode()))
    with CheckpointManager(run, max_to_keep=5) as mgr:
        assert [p.rsplit("-", 1)[1] for p in mgr.checkpoints] == ["3", "4", "5"]
        assert sorted(os.listdir(run)) == sorted(set(os.listdir(run)))
    assert all(os.path.exists(os.path.join(run, f"ckpt-{s}.index")) for s in (3, 4, 5))
