"""``ckpt_callbacks.lightning.ModelCheckpoint`` on a real S3 server whose endpoint is given only through
``storage_options``: top-k, ``save_last="link"``, ``ckpt_path="best"`` and ``ckpt_path="last"``."""

from __future__ import annotations

import importlib
import sys

import pytest
from cloud_helpers import ROOT

sys.path.insert(0, str(ROOT / "tests" / "lightning"))

from lightning_helpers import make_loader, make_trainer, model_class  # noqa: E402 - needs the path above

from ckpt_callbacks import get_checkpoint_state, load_checkpoint  # noqa: E402
from ckpt_callbacks.lightning import ModelCheckpoint  # noqa: E402


@pytest.fixture(params=["lightning.pytorch", "pytorch_lightning"])
def pl(request):
    return importlib.import_module(request.param)


def test_model_checkpoint_on_s3_with_storage_options_only(pl, s3_dir, tmp_path):
    url, options, _ = s3_dir

    def trainer(max_epochs):
        cb = ModelCheckpoint(
            dirpath=url, monitor="val_loss", save_top_k=1, save_last="link", storage_options=options
        )
        return make_trainer(str(tmp_path), [cb], pl=pl, max_epochs=max_epochs), cb

    first, cb = trainer(2)
    model = model_class(pl)()
    first.fit(model, make_loader(), make_loader())
    assert cb.best_model_path.startswith(f"{url}/epoch=") and cb.last_model_path == f"{url}/last.ckpt"
    assert load_checkpoint(cb.last_model_path, storage_options=options)["global_step"] == 12
    first.test(model, make_loader(), ckpt_path="best")

    second, _ = trainer(3)
    second.fit(model_class(pl)(), make_loader(), make_loader(), ckpt_path="last")
    assert second.global_step == 18
    assert get_checkpoint_state(url, options).model_checkpoint_path == f"{url}/ckpt-18"
