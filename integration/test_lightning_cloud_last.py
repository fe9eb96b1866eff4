"""Lightning ``fit(ckpt_path="last")`` on a real S3 server whose endpoint is given only through
``storage_options`` (MinIO, any S3-compatible store), under both Lightning package names."""

from __future__ import annotations

import importlib
import sys

import pytest
from cloud_helpers import ROOT

sys.path.insert(0, str(ROOT / "tests" / "lightning"))

from lightning_helpers import make_loader, make_trainer, model_class  # noqa: E402 - needs the path above

from ckpt_callbacks import get_checkpoint_state  # noqa: E402
from ckpt_callbacks.lightning import CheckpointCallback, FsspecCheckpointIO  # noqa: E402


@pytest.fixture(params=["lightning.pytorch", "pytorch_lightning"])
def pl(request):
    return importlib.import_module(request.param)


@pytest.mark.parametrize("plugin", [False, True])
def test_fit_ckpt_path_last_uses_storage_options(pl, s3_dir, tmp_path, plugin):
    url, options, _ = s3_dir
    plugins = [FsspecCheckpointIO(storage_options=options)] if plugin else []

    def trainer(max_epochs, resume):
        cb = CheckpointCallback(url, save_every_n_steps=4, storage_options=options, resume=resume)
        return make_trainer(str(tmp_path), [cb], pl=pl, max_epochs=max_epochs, plugins=plugins)

    first = trainer(1, True)
    first.fit(model_class(pl)(), make_loader())
    assert get_checkpoint_state(url, options).model_checkpoint_path == f"{url}/ckpt-6"

    second = trainer(2, False)  # resume=False: only ckpt_path="last" resumes
    second.fit(model_class(pl)(), make_loader(), ckpt_path="last")
    assert second.ckpt_path == f"{url}/ckpt-6.index"
    assert second.global_step == 12
    assert get_checkpoint_state(url, options).model_checkpoint_path == f"{url}/ckpt-12"
