"""``ModelCheckpoint``: Lightning's ``ModelCheckpoint`` arguments and decisions, this library's storage.

It *is* Lightning's ``ModelCheckpoint`` (a subclass, bound to the user's package name by
``_compat.Bound``): every decision stays Lightning's own code — when to save (``every_n_train_steps``,
``train_time_interval``, ``every_n_epochs``, ``save_on_train_epoch_end``, ``save_on_exception``),
what ``save_top_k`` keeps, the ``filename`` template and version counter, ``save_last``, the public
state (``best_k_models``, ``kth_value``, ...), ``state_dict`` keys and ``state_key``. Only where the
bytes go changes:

- A save is ``trainer.save_checkpoint(path)``, as in Lightning, so strategy-specific saving and
  ``on_save_checkpoint`` overrides apply. A checkpoint IO installed at setup (:class:`ManagedIO`)
  takes the dict for the path this callback asked for and hands it to a ``CheckpointManager``:
  it becomes ``<prefix>-<global_step>`` in ``dirpath`` (retention, ``checkpoint`` state file, async).
- The path Lightning named (``epoch=0-step=10.ckpt``, ``last.ckpt``) becomes a pointer file naming
  that checkpoint, written once it is committed. Two pointers of one step (a top-k save and
  ``last.ckpt``) name one checkpoint; ``save_last="link"`` is such a pointer on every storage.
- Retention is the manager's: ``save_top_k=k`` keeps the best k (``keep_best``) plus the newest
  (``max_to_keep=1``, the ``last.ckpt`` checkpoint, which Lightning keeps as well), ``-1`` keeps all.
  Only saves Lightning ranks carry the monitored value, so a ``last`` save made between validations
  (a stale value) never takes the place of the checkpoint that value was measured at. A pointer whose
  checkpoint retention deleted is removed, and leaves ``best_k_models``: ``best_model_path`` always
  names a checkpoint that exists.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

from .. import _storage, _validation
from .._api._resolve import pointer_bytes, resolve_one
from .._manager._manager import CheckpointManager
from ..errors import CheckpointError
from . import _compat, _convert
from ._io import _read_marker_quietly, load_any, split_path
from ._model_checkpoint_parts import LinkCheckpoint, ManagedIO, check_filename, quiet_replace
from ._trainer import _fn, _info, _metrics, _rank_zero, check_strategy

Trainer = LightningModule = Any  # either namespace's (see _compat)

_NAME = "ckpt_callbacks.lightning.ModelCheckpoint"
_PICKLED_AWAY = ("_mgr", "_storage", "_replaced_io", "_warning_filter")
_NO_LAST_WARNING = r'\.fit\(ckpt_path="last"\) is set, but there is no last checkpoint available'


def _check_extras(args: dict[str, Any]) -> None:
    """This library's keyword arguments, and the combinations Lightning's do not refuse themselves."""
    _validation.check_storage_options(args["storage_options"])
    _validation.check_flags(
        async_save=args["async_save"], resume=args["resume"], allow_pickle=args["allow_pickle"]
    )
    _validation.check_manager_args(
        args["prefix"],
        args["max_to_keep"],
        args["keep_checkpoint_every_n_hours"],
        None,
        None,
        "min",
        args["clock"],
    )
    if args["dirpath"]:  # "" is Lightning's "the working directory"
        _validation.check_directory(args["dirpath"])
    check_filename(args["filename"], args["auto_insert_metric_name"])
    save_top_k, max_to_keep = args["save_top_k"], args["max_to_keep"]
    if max_to_keep is not None and save_top_k in (0, -1):
        raise ValueError(
            f"max_to_keep cannot be combined with save_top_k={save_top_k}: save_top_k=0 keeps only the "
            "last checkpoint and save_top_k=-1 keeps every one. Received: "
            f"save_top_k={save_top_k!r}, max_to_keep={max_to_keep!r}. Drop max_to_keep, or use "
            "save_top_k=k with a monitor (the best k, plus the newest max_to_keep)."
        )


class ModelCheckpoint(_compat.Bound):
    """Lightning's ``ModelCheckpoint``, saving pickle-free checkpoints of this library to any fsspec URL.

    Change only the import: every argument of Lightning's ``ModelCheckpoint`` keeps its meaning
    (see Lightning's documentation). The file Lightning would write at ``dirpath/<filename>.ckpt``
    is a small pointer naming the checkpoint ``dirpath/<prefix>-<global_step>`` (``.index``,
    ``.meta``, ``.data-*`` files and the ``checkpoint`` state file, as ``CheckpointCallback``
    writes); ``trainer.test(ckpt_path="best")``, ``fit(ckpt_path="last")`` and
    ``load_from_checkpoint`` accept those pointers.

    Args (this library's, keywords only):
        max_to_keep: also keep the newest N checkpoints (default: Lightning's rule — the best
            ``save_top_k`` plus the newest one; every one with ``save_top_k=-1``).
        keep_checkpoint_every_n_hours: also keep one checkpoint per N hours, forever.
        storage_options: passed to fsspec (credentials, endpoint, ...).
        async_save: return from a save after an in-memory snapshot; writing continues in the
            background (its pointer files are written once it is committed).
        resume: at fit start, when no ``ckpt_path`` is given, restore the newest valid checkpoint of
            ``dirpath`` (off by default, as in Lightning).
        prefix: checkpoint names are ``f"{prefix}-{step}"``.
        allow_pickle: store (and load) leaves that are not plain tree types with pickle.
        clock: zero-argument callable returning POSIX seconds, for retention; for tests.

    Raises:
        ValueError: an argument whose meaning cannot be kept: a ``filename`` with a directory part
            (the pointer and its checkpoint live in ``dirpath``), or ``save_top_k=0`` / ``-1`` with
            ``max_to_keep``. Lightning's own argument checks raise its ``MisconfigurationException``,
            here also a ``ValueError``.

    Example:
        >>> from ckpt_callbacks.lightning import ModelCheckpoint
        >>> cb = ModelCheckpoint(dirpath="s3://bucket/run", monitor="val_loss", save_top_k=2, save_last=True)
        >>> trainer = Trainer(callbacks=[cb]); trainer.fit(model)
        >>> trainer.test(model, ckpt_path="best")
    """

    _role = "callback"

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | str | None = None,
        save_top_k: int = 1,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: Any = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
        *,
        max_to_keep: int | None = None,
        keep_checkpoint_every_n_hours: float | None = None,
        storage_options: dict | None = None,
        async_save: bool = False,
        resume: bool = False,
        prefix: str = "ckpt",
        allow_pickle: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_extras(locals())
        try:
            super().__init__(
                dirpath=dirpath,
                filename=filename,
                monitor=monitor,
                verbose=verbose,
                save_last=save_last,
                save_top_k=save_top_k,
                save_on_exception=save_on_exception,
                save_weights_only=save_weights_only,
                mode=mode,
                auto_insert_metric_name=auto_insert_metric_name,
                every_n_train_steps=every_n_train_steps,
                train_time_interval=train_time_interval,
                every_n_epochs=every_n_epochs,
                save_on_train_epoch_end=save_on_train_epoch_end,
                enable_version_counter=enable_version_counter,
            )
        except Exception as e:
            raise _compat.as_value_error(e) from None
        self.max_to_keep = max_to_keep
        self.keep_checkpoint_every_n_hours = keep_checkpoint_every_n_hours
        self.storage_options = dict(storage_options) if storage_options else None
        self.async_save = async_save
        self.resume = resume
        self.prefix = prefix
        self.allow_pickle = allow_pickle
        self._clock = clock
        if self.dirpath is not None:
            self._fs = _storage.Storage(self._dir(), self.storage_options).fs
        self._init_state()

    def _init_state(self) -> None:
        """The callback's own working state, beside Lightning's."""
        self._mgr: CheckpointManager | None = None
        self._storage: Any = None  # the Storage of dirpath (pointer files), with the manager
        self._replaced_io: tuple[Any, Any] | None = None
        self._pending: tuple[str, Any] | None = None  # (path, trainer) of the save this callback asked for
        self._ranked: float | None = None  # the monitored value Lightning ranked that save by
        self._saved: tuple[int, str, bool] | None = None  # (step, checkpoint name, ranked) of the newest save
        self._measured: tuple[int, float] | None = None  # (step, monitored value) of the last validation
        self._topk_pending = False  # a top-k save waits for the next validation (its value was stale)
        self._last_requested: str | None = None  # fit(ckpt_path="last") on a URL: loaded in on_fit_start
        self._resumed: str | None = None  # the checkpoint of dirpath this fit resumed from
        self._warning_filter: Any = None
        self._pointers: dict[str, str] = {}  # pointer name -> checkpoint name, written
        self._unwritten: list[tuple[str, str]] = []  # pointers whose checkpoint is not committed yet
        self._warned_hparams: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (ddp_spawn, deepcopy of a Trainer's callbacks): live resources stay here.
        state = self.__dict__.copy()
        state.update(dict.fromkeys(_PICKLED_AWAY))
        return state

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        ns = self._check_namespace(trainer)
        try:
            check_strategy(trainer.strategy)
        except ValueError as e:
            raise ValueError(str(e).replace("CheckpointCallback", _NAME, 1)) from None
        dirpath = trainer.strategy.broadcast(_compat.resolve_ckpt_dir(self, trainer))
        self.dirpath = os.fspath(dirpath)
        self._fs = _storage.Storage(self.dirpath, self.storage_options).fs
        if trainer.is_global_zero and stage == "fit":
            _compat.warn_if_dir_not_empty(self, self.dirpath)
        self._install_io(trainer, ns)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resumed = self._resumed_name(trainer.ckpt_path)
        last, self._last_requested = self._last_requested, None
        if self._warning_filter is not None:
            with contextlib.suppress(ValueError):
                warnings.filters.remove(self._warning_filter)
            self._warning_filter = None
        if last is not None:
            found = load_any(last, self.storage_options, self.allow_pickle)
        elif self.resume and trainer.ckpt_path is None and not trainer.fast_dev_run:
            found = load_any(self._dir(), self.storage_options, self.allow_pickle)
        else:
            return
        if found is not None:
            path, checkpoint = found
            _compat.restore_before_setup(trainer, last or path, checkpoint)
            _rank_zero(
                trainer, f"{_NAME}: resuming from {last or path} (step {checkpoint.get('global_step')})."
            )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        fresh = value is not None and not trainer.sanity_checking
        if fresh:
            self._measured = (trainer.global_step, float(value))
        super().on_validation_end(trainer, pl_module)
        if self._topk_pending and fresh and not self._skip(trainer):
            # Rank the weights this value was measured on: a checkpoint of this step (a pointer to
            # the one just saved, if any), never a later one carrying the value over.
            self._topk_pending = False
            if self._saved is None or self._saved[0] != trainer.global_step or not self._saved[2]:
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._mgr is not None:
            self._mgr.wait_until_finished()  # a failed background save raises here, before fit returns
        self._sync(trainer, final=True)  # on every rank: it broadcasts the pointers dropped

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hook after an exception: release the manager and the IO here.
        try:
            super().on_exception(trainer, pl_module, exception)
        finally:
            self._release(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release(trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's, then without the checkpoints of ``dirpath`` deleted since that state was saved
        (resuming from an older checkpoint); paths elsewhere are restored as Lightning does."""
        super().load_state_dict(state_dict)
        named = {*self.best_k_models, self.best_model_path, self.kth_best_model_path} - {""}
        mine = [p for p in named if split_path(p)[0].rstrip("/") == self._dir().rstrip("/")]
        gone = [p for p in mine if not self._fs.exists(p)]
        if gone:
            self._forget(gone)

    # ------------------------------------------------------------------ Lightning's seams

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Any]) -> None:
        """Lightning's top-k, ranking only values measured at this step (the save between two
        validations waits for the next one: Lightning would rank it by the last validation's value)."""
        if self.monitor is not None and self.save_top_k != 0 and self._stale(trainer, monitor_candidates):
            self._topk_pending = True
            if monitor_candidates.get(self.monitor) is not None:
                if self.save_top_k == -1:  # every save is kept: save it now, rank it never
                    path = self._get_metric_interpolated_filepath_name(monitor_candidates, trainer)
                    self._save_checkpoint(trainer, path)
                return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _stale(self, trainer: Trainer, monitor_candidates: dict[str, Any]) -> bool:
        current = monitor_candidates.get(self.monitor)
        if current is None:
            return True  # not measured yet (Lightning warns, or raises once validation has run)
        if self._measured is None or self._measured[0] == trainer.global_step:
            return False
        return float(current) == self._measured[1]  # a validation value carried over to a later step

    def _skip(self, trainer: Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.sanity_checking or _fn(trainer) != "fit"

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        value = self.best_k_models.get(filepath) if self.monitor else None
        self._pending, self._ranked = (filepath, trainer), None if value is None else float(value)
        try:
            super()._save_checkpoint(trainer, filepath)
        finally:
            self._pending = self._ranked = None
        self._sync(trainer)

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        """``last*.ckpt`` pointers for ``ckpt_path="last"``, listed with ``storage_options`` and named
        with their URL scheme (Lightning's listing drops it, and then finds nothing remote)."""
        dirpath = os.fspath(
            self.dirpath if self.dirpath is not None else _compat.resolve_ckpt_dir(self, trainer)
        )
        storage = _storage.Storage(dirpath, self.storage_options)
        last = re.compile(rf"{self.CHECKPOINT_NAME_LAST}(-\d+)?.*{re.escape(self.FILE_EXTENSION)}\Z")
        found = {os.path.join(dirpath, n) for n in storage.list_names() if last.match(n)}
        if found and "://" in dirpath and not dirpath.startswith("file://") and _fn(trainer) == "fit":
            # Lightning would stat these with default fsspec options (no endpoint or credentials of
            # storage_options): the newest is picked here and loaded in on_fit_start instead.
            self._last_requested = max(found, key=lambda p: (storage.fs.modified(p), p))
            warnings.filterwarnings("ignore", message=_NO_LAST_WARNING)
            self._warning_filter = warnings.filters[0]
            return set()
        return found

    _link_checkpoint = LinkCheckpoint()

    def file_exists(self, filepath: Any, trainer: Trainer) -> bool:
        """Lightning's check (version counter), counting pointers still waiting for their checkpoint."""
        name = split_path(os.fspath(filepath))[1]
        local = False
        if trainer.is_global_zero:
            local = any(p == name for p, _ in self._unwritten) or self._fs.exists(os.fspath(filepath))
        return bool(trainer.strategy.reduce_boolean_decision(local, all=False))

    def _link_pointer(self, trainer: Trainer, filepath: str, linkpath: str) -> None:
        """``save_last="link"``: ``linkpath`` becomes a pointer to ``filepath``'s checkpoint (any storage)."""
        if trainer.is_global_zero and filepath != linkpath:
            name, link = split_path(filepath)[1], split_path(linkpath)[1]
            target = self._pointers.get(name) or dict(self._unwritten).get(name)
            if target is not None:
                self._unwritten = [(p, t) for p, t in self._unwritten if p != link] + [(link, target)]
        self._sync(trainer)
        trainer.strategy.barrier()

    def _remove_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        """The pointer only: the checkpoint's files are the manager's to delete (its retention)."""
        if not trainer.is_global_zero:
            return
        directory, name = split_path(filepath)
        storage = self._storage if directory.rstrip("/") == self._dir().rstrip("/") else None
        self._unwritten = [(p, t) for p, t in self._unwritten if p != name]
        if storage is not None and (self._pointers.pop(name, None) or not storage.exists(name)):
            storage.remove([name])  # ours, or already gone with its checkpoint (retention)
        elif storage is None or _read_marker_quietly(storage, name) is None:
            trainer.strategy.remove_checkpoint(filepath)  # not ours: as Lightning would
        else:
            storage.remove([name])  # a pointer of an earlier run

    # ------------------------------------------------------------------ internals

    def _dir(self) -> str:
        return os.fspath(self.dirpath) or "."

    def _join(self, name: str) -> str:
        return os.path.join(os.fspath(self.dirpath), name)  # as Lightning's format_checkpoint_name joins

    def _install_io(self, trainer: Trainer, ns: str) -> None:
        strategy = trainer.strategy
        if self._replaced_io is not None and self._replaced_io[0] is strategy:
            return  # setup again without teardown
        current = strategy.checkpoint_io
        io_class = _compat.bound_class(ManagedIO, "checkpoint_io", (ns,))
        try:
            strategy.checkpoint_io = io_class(current, self.storage_options, self.allow_pickle, self)
        except (TypeError, ValueError, AssertionError) as e:
            raise ValueError(
                f"{_NAME} saves through the strategy's checkpoint IO, but {type(strategy).__name__} accepts "
                f"only its own ({e}). Received: strategy={type(strategy).__name__}. Use Lightning's own "
                "ModelCheckpoint with this strategy."
            ) from None
        self._replaced_io = (strategy, current)

    def _manager(self) -> CheckpointManager:
        """The manager, made at the first save (``setup`` alone starts nothing: no lock, no thread)."""
        if self._mgr is None:
            ranked = self.monitor is not None and self.save_top_k > 0
            window = (
                self.max_to_keep if self.max_to_keep is not None else (None if self.save_top_k == -1 else 1)
            )
            self._mgr = CheckpointManager(
                self._dir(),
                prefix=self.prefix,
                max_to_keep=window,
                keep_checkpoint_every_n_hours=self.keep_checkpoint_every_n_hours,
                keep_best=self.save_top_k if ranked else None,
                monitor=self.monitor if ranked else None,
                mode=self.mode,
                storage_options=self.storage_options,
                async_save=self.async_save,
                allow_pickle=self.allow_pickle,
                clock=self._clock,
                _keep=frozenset({self._resumed} if self._resumed else ()),
            )
            self._storage = _storage.Storage(self._dir(), self.storage_options)
            self._pointers = self._existing_pointers()
        return self._mgr

    def _resumed_name(self, ckpt_path: Any) -> str | None:
        """The checkpoint of ``dirpath`` that ``fit(ckpt_path=...)`` resumed from. Lightning never deletes
        the checkpoint a run resumed from, so its manager keeps it for the whole run."""
        with contextlib.suppress(CheckpointError, ValueError, OSError, TypeError):
            target = resolve_one(os.fspath(ckpt_path), self.storage_options) if ckpt_path else None
            if target is not None:
                directory, name = split_path(target)
                options = self.storage_options
                if _storage.Storage(directory, options).url == _storage.Storage(self._dir(), options).url:
                    return name
        return None

    def _existing_pointers(self) -> dict[str, str]:
        """Pointers of earlier runs in ``dirpath`` (a resumed run removes them with their checkpoint)."""
        out = {}
        for name in self._storage.list_names():
            if name.endswith(self.FILE_EXTENSION):
                target = _read_marker_quietly(self._storage, name)
                if target is not None:
                    out[name] = target
        return out

    def _write(self, checkpoint: dict[str, Any], path: str, trainer: Trainer) -> None:
        """Rank zero, inside ``trainer.save_checkpoint``: the dict becomes ``<prefix>-<step>``; ``path`` its pointer."""
        mgr = self._manager()
        step = int(checkpoint.get("global_step") or 0)
        ranked = self._ranked is not None
        if self._saved is not None and self._saved[0] == step and (self._saved[2] or not ranked):
            target = self._saved[1]  # a second pointer of this step (a top-k save, then last.ckpt)
        else:  # a new step, or this step again now ranked (its value measured just after the save)
            metrics = _metrics(trainer)
            metrics.pop(self.monitor, None)
            if self._ranked is not None:
                metrics[self.monitor] = self._ranked
            tree = _convert.to_tree(checkpoint, allow_pickle=self.allow_pickle, warned=self._warned_hparams)
            info = _info(trainer, trainer.lightning_module)
            with quiet_replace(self._saved is not None and self._saved[0] == step):
                target = split_path(mgr.save(tree, step=step, metrics=metrics, _info=info))[1]
            self._saved = (step, target, ranked)
        name = split_path(path)[1]
        self._unwritten = [(p, t) for p, t in self._unwritten if p != name] + [(name, target)]

    def _point(self, name: str, target: str) -> None:
        self._storage.write_bytes(name, pointer_bytes(target))
        self._storage.sync_dir()
        self._pointers[name] = target

    def _sync(self, trainer: Trainer, final: bool = False, collective: bool = True) -> None:
        """Write the pointers of committed checkpoints; drop those whose checkpoint retention deleted."""
        gone: list[str] = []
        if trainer.is_global_zero and self._mgr is not None:
            kept = {split_path(p)[1] for p in self._mgr.checkpoints}
            waiting = []
            for name, target in self._unwritten:
                if target in kept:
                    self._point(name, target)
                elif final or not self.async_save:  # committed, then deleted by retention
                    gone.append(name)
                else:
                    waiting.append((name, target))
            self._unwritten = waiting
            dead = [name for name, target in self._pointers.items() if target not in kept]
            for name in dead:
                del self._pointers[name]
            self._storage.remove(dead)
            gone += dead
        if collective and trainer.world_size > 1:
            gone = trainer.strategy.broadcast(gone, src=0)
        if gone:
            self._forget([self._join(name) for name in gone])

    def _forget(self, paths: list[str]) -> None:
        """Lightning's state without checkpoints that no longer exist (its own min / max rules)."""
        for path in paths:
            self.best_k_models.pop(path, None)
            if self.last_model_path == path:
                self.last_model_path = ""
        if self.best_model_path in paths or self.kth_best_model_path in paths:
            best, worst = (min, max) if self.mode == "min" else (max, min)
            scores = self.best_k_models
            self.best_model_path = best(scores, key=scores.get) if scores else ""
            self.best_model_score = scores[self.best_model_path] if scores else None
            self.kth_best_model_path = worst(scores, key=scores.get) if scores else ""
            if scores:
                self.kth_value = scores[self.kth_best_model_path]

    def _release(self, trainer: Trainer) -> None:
        if self._replaced_io is not None:
            strategy, original = self._replaced_io
            strategy.checkpoint_io = original
            self._replaced_io = None
        if self._mgr is not None:
            try:  # after an exception too: the pointers of the saves still in flight
                self._mgr.wait_until_finished()
                self._sync(trainer, final=True, collective=False)  # rank zero only holds a manager
            except CheckpointError as e:
                _rank_zero(trainer, f"{_NAME}: a background save had failed: {e}", warn=True)
            mgr, self._mgr = self._mgr, None
            self._saved = None
            try:
                mgr.close()
            except CheckpointError as e:  # already raised in on_train_end unless fit failed
                _rank_zero(trainer, f"{_NAME}: a background save had failed: {e}", warn=True)
