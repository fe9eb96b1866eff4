"""A save killed in the middle of an S3 multipart upload leaves that upload pending (invisible, but
stored and billed); the next manager start aborts it (leftovers of an interrupted save are
removed on the next manager start: README, "On storage"). Only pending uploads of this format's names directly in the
directory are touched: a foreign upload, or one in a sub-directory, stays.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
from cloud_helpers import ROOT, S3_BUCKET, pending_uploads

from ckpt_callbacks import CheckpointManager, latest_checkpoint
from ckpt_callbacks._cli._main import main as cli_main

# Killed after this many parts of the data file went up; the file has four 8 MiB parts.
KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import numpy as np
    import ckpt_callbacks._storage._s3 as cloud
    from ckpt_callbacks import CheckpointManager

    url, so = sys.argv[1], json.loads(sys.argv[2])
    real = cloud.S3MultipartWriter._upload_part

    async def upload_then_die(self, number, *args):
        part = await real(self, number, *args)
        if number == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return part

    with CheckpointManager(url, storage_options=so) as mgr:
        mgr.save({"w": np.zeros(4, np.float32)}, step=1)
        cloud.S3MultipartWriter._upload_part = upload_then_die
        mgr.save({"w": np.ones(8 << 20, np.float32)}, step=2)
    """
)


def _keys(uploads: list[dict]) -> set[str]:
    return {u["Key"] for u in uploads}


def _abort_all(s3_client: Any, prefix: str) -> None:
    for u in pending_uploads(s3_client, prefix + "/"):
        s3_client.abort_multipart_upload(Bucket=S3_BUCKET, Key=u["Key"], UploadId=u["UploadId"])


def _foreign_uploads(s3_client: Any, prefix: str) -> set[str]:
    """Pending uploads the manager must leave alone: another name, and our name one level down."""
    keys = {f"{prefix}/notes.bin", f"{prefix}/sub/ckpt-9.index"}
    for key in keys:
        s3_client.create_multipart_upload(Bucket=S3_BUCKET, Key=key)
    return keys


def test_killed_upload_is_aborted_at_next_start(s3_dir: tuple[str, dict, str], s3_client: Any) -> None:
    url, so, prefix = s3_dir
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, url, json.dumps(so)], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    data_key = f"{prefix}/ckpt-2.data-00000-of-00001"
    assert _keys(pending_uploads(s3_client, prefix + "/")) == {data_key}
    foreign = _foreign_uploads(s3_client, prefix)

    with CheckpointManager(url, storage_options=so) as mgr:
        assert mgr.aborted_uploads == ["ckpt-2.data-00000-of-00001"]
        assert _keys(pending_uploads(s3_client, prefix + "/")) == foreign
        assert mgr.latest_checkpoint.endswith("/ckpt-1")
        np.testing.assert_array_equal(mgr.restore()["w"], np.zeros(4, np.float32))
        # The directory still works: a save of the same step commits.
        mgr.save({"w": np.full(3, 2.0, np.float32)}, step=2)
    assert latest_checkpoint(url, storage_options=so).endswith("/ckpt-2")
    assert _keys(pending_uploads(s3_client, prefix + "/")) == foreign
    _abort_all(s3_client, prefix)


def test_cli_gc_reports_aborted_uploads(s3_dir: tuple[str, dict, str], s3_client: Any, capsys: Any) -> None:
    url, so, prefix = s3_dir
    ours = f"{prefix}/ckpt-3.data-00000-of-00002"
    s3_client.create_multipart_upload(Bucket=S3_BUCKET, Key=ours)
    foreign = _foreign_uploads(s3_client, prefix)
    endpoint = so["client_kwargs"]["endpoint_url"]
    options = [
        f"key={so['key']}",
        f"secret={so['secret']}",
        f"client_kwargs.endpoint_url={endpoint}",
        f"client_kwargs.region_name={so['client_kwargs']['region_name']}",
    ]
    args = ["gc", url] + [a for o in options for a in ("--storage-option", o)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert f"aborted pending upload of {url}/ckpt-3.data-00000-of-00002" in out
    assert _keys(pending_uploads(s3_client, prefix + "/")) == foreign
    _abort_all(s3_client, prefix)
