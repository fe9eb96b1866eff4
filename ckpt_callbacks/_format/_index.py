"""The ``.index`` document as types: what the format writes and every reader finds after
:func:`._format.validate_index` (and ``_checkpoint_read.read_index``) accepted it.

Types only, for readers and the type checker: at run time an index is the parsed JSON dict.
"""

from __future__ import annotations

from typing import Any, TypedDict


class FileEntry(TypedDict, total=False):
    """One file of a checkpoint: a data file (``kind`` "data", with its safetensors ``header_size``)
    or the ``.meta`` (``kind`` "meta"). A data file may belong to an earlier checkpoint of the same
    directory (incremental checkpoints)."""

    name: str
    kind: str
    size: int
    header_size: int
    checksum: str


class ChunkEntry(TypedDict):
    """One piece of a chunked tensor (a sharded save): where it is and which box of the tensor it holds."""

    file: int
    offset: int
    length: int
    offsets: list[int]
    sizes: list[int]
    checksum: str


class IndexTensor(TypedDict, total=False):
    """One tensor: its global dtype and shape, and either one location (``file`` — a position in the
    index's ``files`` —, ``offset``, ``length``, ``checksum``) or ``chunks``."""

    dtype: str
    shape: list[int]
    file: int
    offset: int
    length: int
    checksum: str
    kind: str  # absent for numpy; "torch" for torch tensors
    byteorder: str  # absent for little-endian; ">" for arrays saved big-endian
    chunks: list[ChunkEntry]


class Index(TypedDict, total=False):
    """A checkpoint's ``.index``: written after every file it names; the checkpoint exists once it does."""

    format: str
    format_version: int
    step: int
    files: list[FileEntry]
    tensors: dict[str, IndexTensor]
    tree: Any
    dcp: dict[str, Any]  # DCP's flattened key names (sharded saves through torch.distributed.checkpoint)
