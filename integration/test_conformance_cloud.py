"""The storage conformance suite (tests/conformance) against a real local S3 server and GCS emulator."""

from __future__ import annotations

from typing import Any

import pytest
from conformance_suite import Backend, ManagerConformance

# A 24 MiB state with the sharding threshold forced to 10 MiB: object stores split it into 3 shards.
LARGE_SHARDS_ON_OBJECT_STORES = 3


class TestS3(ManagerConformance):
    @pytest.fixture
    def backend(self, s3_dir: tuple[str, dict[str, Any], str]) -> Backend:
        url, so, _prefix = s3_dir  # s3_dir also checks that no multipart upload is left pending
        return Backend("s3", url, so, extra={"large_shards": LARGE_SHARDS_ON_OBJECT_STORES})


class TestGCS(ManagerConformance):
    @pytest.fixture
    def backend(self, gcs_dir: tuple[str, dict[str, Any]]) -> Backend:
        url, so = gcs_dir
        return Backend("gs", url, so, extra={"large_shards": LARGE_SHARDS_ON_OBJECT_STORES})
