"""Reading needs no torch: a checkpoint of torch tensors loads as numpy where torch cannot be imported,
and ``ml_dtypes`` is imported only by a checkpoint or state that holds its dtypes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ckpt_callbacks import list_variables, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter where `import torch` fails as it does where torch is not installed.
_NO_TORCH = """
import json, sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
import numpy as np
from ckpt_callbacks import list_variables, load_checkpoint
state = load_checkpoint(sys.argv[1])
print(json.dumps({
    "types": {k: type(v).__module__ + "." + type(v).__name__ for k, v in sorted(state.items())},
    "w": state["w"].tolist(),
    "h": [float(x) for x in state["h"]],
    "h_dtype": str(state["h"].dtype),
    "vars": list_variables(sys.argv[1]),
}))
"""


def _run(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_torch_checkpoint_loads_as_numpy_without_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="writing the checkpoint needs torch")
    path = str(tmp_path / "ckpt-3")
    save_checkpoint(
        path,
        {"w": torch.arange(3, dtype=torch.float32), "h": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)},
    )
    got = _run(_NO_TORCH, path)
    assert got["types"] == {"h": "numpy.ndarray", "w": "numpy.ndarray"}
    assert got["w"] == [0.0, 1.0, 2.0]
    assert got["h"] == [1.5, -2.0] and got["h_dtype"] == "bfloat16"
    assert got["vars"] == [["h", "bfloat16", [2]], ["w", "float32", [3]]]
    # Where torch is importable, the same checkpoint gives torch tensors back, as it always did.
    state = load_checkpoint(path)
    assert isinstance(state["w"], torch.Tensor) and state["h"].dtype == torch.bfloat16
    assert list_variables(path) == [("h", "bfloat16", (2,)), ("w", "float32", (3,))]


_ML_DTYPES_USE = """
import json, sys
import numpy as np
import ckpt_callbacks
seen = {"import": "ml_dtypes" in sys.modules}
from ckpt_callbacks import load_checkpoint, save_checkpoint
save_checkpoint(sys.argv[1] + "/ckpt-1", {"w": np.zeros(3, np.float32), "n": 1.5})
load_checkpoint(sys.argv[1] + "/ckpt-1")
seen["float32"] = "ml_dtypes" in sys.modules
load_checkpoint(sys.argv[2])
seen["bfloat16"] = "ml_dtypes" in sys.modules
print(json.dumps(seen))
"""


def test_ml_dtypes_is_imported_only_for_its_dtypes(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = str(tmp_path / "bf16-1")
    save_checkpoint(bf16, {"h": np.ones(2, dtype=ml_dtypes.bfloat16)})
    (tmp_path / "f32").mkdir()
    got = _run(_ML_DTYPES_USE, str(tmp_path / "f32"), bf16)
    assert got == {"import": False, "float32": False, "bfloat16": True}
