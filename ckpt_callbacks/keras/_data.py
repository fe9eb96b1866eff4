"""Exact mid-epoch resume: a deterministic ``keras.utils.PyDataset`` whose position the callback restores."""

from __future__ import annotations

import math
import weakref
from typing import Any

import keras
import numpy as np


class ResumableDataset(keras.utils.PyDataset):
    """Batches of numpy arrays in a seeded, per-epoch order that a resumed ``fit`` can skip into.

    Keras' own input pipelines restart an epoch from its first batch. This dataset instead takes its
    epoch and its starting batch from the :class:`CheckpointCallback` it is linked to: after a resume
    from a checkpoint saved after batch ``k`` of epoch ``e``, epoch ``e`` yields only its batches
    ``k, k+1, ...``, drawn from the same permutation as in the interrupted run, so the resumed run sees
    exactly the batches the uninterrupted run would have seen. The shortened epoch ends early; later
    epochs are complete.

    The order of epoch ``e`` depends only on ``(seed, e)``, never on a global RNG. Pass
    ``shuffle=False`` to ``model.fit`` (this dataset shuffles itself; Keras' batch shuffling of a
    PyDataset draws from Python's global RNG and cannot be replayed), and no ``steps_per_epoch``.

    Args:
        x: input array, or a list / tuple / dict of arrays with the same first dimension.
        y: target array(s), or None.
        sample_weight: per-sample weights, or None.
        batch_size: samples per batch (the last batch of an epoch may be smaller).
        callback: the :class:`CheckpointCallback` passed to the same ``fit``; it tells this dataset
            which epoch runs and where the resumed epoch starts.
        shuffle: draw a new permutation of the samples each epoch, seeded by ``(seed, epoch)``.
        seed: the shuffle seed.
        **kwargs: ``workers``, ``use_multiprocessing``, ``max_queue_size`` for ``keras.utils.PyDataset``.

    Example:
        >>> cb = CheckpointCallback("runs/a", save_every_n_steps=100)
        >>> data = ResumableDataset(x_train, y_train, batch_size=32, callback=cb, seed=1)
        >>> model.fit(data, epochs=10, shuffle=False, callbacks=[cb])
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        batch_size: int = 32,
        callback: Any,
        shuffle: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from ._callback import CheckpointCallback

        if not isinstance(callback, CheckpointCallback):
            raise ValueError(
                "ResumableDataset needs the CheckpointCallback that restores its position. "
                f"Received: callback={callback!r}. Pass callback=cb and the same cb to model.fit(callbacks=[cb])."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1. Received: batch_size={batch_size!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0. Received: seed={seed!r}. Use e.g. seed=0.")
        leaves = [a for a in keras.tree.flatten((x, y, sample_weight)) if a is not None]
        sizes = {len(a) for a in leaves}
        if len(sizes) != 1:
            raise ValueError(
                "x, y and sample_weight must all have the same number of samples. "
                f"Received first dimensions: {sorted(sizes)}."
            )
        self._x, self._y, self._sw = x, y, sample_weight
        self._n = sizes.pop()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        # Written by the callback's on_epoch_begin, read by Keras' data thread; both are plain ints.
        self._epoch = 0
        self._skip = 0
        self._perm: tuple[int, np.ndarray] | None = None
        self._served: set[int] = set()
        callback._attach_dataset(self)
        self._callback = weakref.ref(callback)

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a complete epoch."""
        return math.ceil(self._n / self.batch_size)

    @property
    def num_batches(self) -> int:
        return self.batches_per_epoch - self._skip

    def __len__(self) -> int:
        return self.num_batches

    def _set_position(self, epoch: int, skip: int) -> None:
        # `_served` is not reset here: a reader Keras abandoned at the end of the last epoch (TensorFlow
        # prefetches from it) may still ask for its next batch; the first epoch is enough to catch
        # a Keras-shuffled order.
        self._epoch, self._skip = int(epoch), int(skip)

    def _check_sequential(self, index: int) -> None:
        # Keras reads a PyDataset front to back (several readers may run at once, each from 0) unless
        # fit(shuffle=True) permutes the batch indices with Python's global RNG: that order could not
        # be replayed by a resume. One worker thread reads in order; a pool may legitimately not.
        if self.workers > 1 or self.use_multiprocessing:
            return
        if index and index - 1 not in self._served:
            raise ValueError(
                "ResumableDataset was read out of order: Keras is shuffling its batches. Expected "
                f"model.fit(..., shuffle=False) (this dataset shuffles itself, seeded by (seed, epoch)). "
                f"Received: batch {index} before batch {index - 1}. Pass shuffle=False to fit()."
            )
        self._served.add(index)

    def _permutation(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        cached = self._perm
        if cached is not None and cached[0] == epoch:
            return cached[1]
        perm = np.random.default_rng([self.seed, epoch]).permutation(self._n)
        self._perm = (epoch, perm)
        return perm

    def __getitem__(self, index: int) -> tuple:
        epoch, skip = self._epoch, self._skip
        index = int(index)
        self._check_sequential(index)
        position = skip + index
        if not 0 <= position < self.batches_per_epoch:
            raise IndexError(
                f"batch {index} is out of range for this epoch ({self.batches_per_epoch - skip} batches)."
            )
        start = position * self.batch_size
        stop = min(start + self.batch_size, self._n)
        perm = self._permutation(epoch)
        idx = slice(start, stop) if perm is None else perm[start:stop]

        def take(a: Any) -> Any:
            return None if a is None else np.asarray(a)[idx]

        x = keras.tree.map_structure(take, self._x)
        if self._y is None:
            return (x,)
        y = keras.tree.map_structure(take, self._y)
        if self._sw is None:
            return x, y
        return x, y, keras.tree.map_structure(take, self._sw)
