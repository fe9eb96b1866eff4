"""``CheckpointCallback`` for Lightning: step / time / epoch triggered saves through CheckpointManager.

Thin and stateful: it decides "save now?" from ``trainer.global_step`` and an injectable clock,
asks Lightning for its full checkpoint dict (``dump_checkpoint``, the same dict
``trainer.save_checkpoint`` writes), adds the RNG states, and hands it to the core manager.

Its instances are ``ModelCheckpoint`` subclasses (of ``lightning`` and / or ``pytorch_lightning``,
see ``_compat.bound_class``) for one reason: that is the only kind of callback Lightning asks to
resolve ``trainer.fit(ckpt_path="last")`` (``_CheckpointConnector._parse_ckpt_path`` calls
``ModelCheckpoint._find_last_checkpoints``). Every ``ModelCheckpoint`` hook is overridden; none of
its own saving runs. Strategies it cannot restore exactly are refused at setup (:func:`check_strategy`).
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .._api._resolve import get_checkpoint_state, resolve_checkpoint
from .._callbacks._callback_config import CallbackConfig, prepare_snapshot_once
from .._format._names import join_url as _join
from .._manager import _foreign
from .._manager._manager import CheckpointManager
from .._manager._mode import resolve_mode
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
)
from . import _compat, _convert, _inplace, _resume, _rng, _sharded
from ._io import INDEX_SUFFIX, FsspecCheckpointIO, _DispatchingCheckpointIO
from ._trainer import (  # noqa: F401 (check_strategy: public here)
    WarningFilters,
    _fast_forward,
    _fn,
    _gather,
    _info,
    _metrics,
    _no_trainer,
    _rank_zero,
    check_strategy,
    position,
    raise_everywhere,
    time_due_everywhere,
)

Trainer = LightningModule = Any  # either namespace's (see _compat)

_STATE_VERSION = 1
_SHARDED_LAST = (
    "ckpt_path='last' outside fit is not supported with CheckpointCallback under ModelParallelStrategy "
    "(Lightning would load it through the strategy's own checkpoint format). Received: ckpt_path='last'. "
    "Load the weights with ckpt_callbacks.load_checkpoint(directory) (full tensors) instead."
)
_NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"
# Lightning's warning when no ModelCheckpoint named a "last" path; wrong when this callback resumes itself.
_NO_LAST_WARNING = r'\.fit\(ckpt_path="last"\) is set, but there is no last checkpoint available'


class CheckpointCallback(_compat.Bound):
    """Saves the whole training state every N steps / seconds / epochs and resumes from the newest.

    A checkpoint carries everything Lightning's own checkpoint dict carries (``state_dict``,
    ``optimizer_states``, ``lr_schedulers``, ``loops``, ``callbacks``, ``hyper_parameters``,
    precision-plugin and datamodule state, ``on_save_checkpoint`` additions) plus the torch, CUDA,
    numpy and python RNG states of every rank, in this library's pickle-free format. No plugin is
    needed; with ``Trainer(plugins=[FsspecCheckpointIO()])`` Lightning's ``ModelCheckpoint`` writes
    the same format too.

    Under DDP only global rank zero writes and deletes; every rank takes the same decision (the
    step count is global, the time-based decision is broadcast from rank zero), and a failed save
    raises on every rank (rank zero broadcasts the outcome after each save).

    It is a ``ModelCheckpoint`` subclass so that ``trainer.fit(model, ckpt_path="last")`` resolves
    to its newest valid checkpoint; Lightning therefore adds no default ``ModelCheckpoint`` next to it.

    Args:
        directory: local path or fsspec URL of the checkpoint directory (``"s3://bucket/run"``).
        save_every_n_steps: save when ``trainer.global_step`` (optimizer steps) crosses a multiple of N.
        save_every_n_seconds: save when this many seconds passed since the last save (or train start).
        save_on_epoch_end: save at the end of every training epoch.
        save_on_train_end: save when training ends.
        max_to_keep: the newest N checkpoints are kept; ``None`` keeps all.
        keep_checkpoint_every_n_hours: also keep one checkpoint per N hours, forever.
        keep_best: also keep the best K checkpoints by ``monitor`` (a logged metric).
        monitor: metric name in ``trainer.callback_metrics`` ranked by ``keep_best``.
        mode: ``"min"`` or ``"max"``: whether a smaller or a larger ``monitor`` is better. ``"auto"`` (the
            default, as in the Keras callback): ``loss`` and names containing ``loss`` / ``error`` are
            minimised, accuracy-like names (``acc``, ``auc``, ``precision``, ``recall``, ``f1``,
            ``iou``, ...) maximised, anything else minimised.
        save_optimizer: store optimizer states. Without them a resume restarts the optimizer.
        resume: at fit start, when no ``ckpt_path`` is given, restore the newest valid checkpoint.
        async_save: return from a save after an in-memory snapshot; writing continues in the background.
        storage_options: passed to fsspec (credentials, endpoint, ...).
        prefix: checkpoint names are ``f"{prefix}-{step}"``.
        allow_pickle: store (and load) leaves that are not plain tree types with pickle.
        clock: zero-argument callable returning POSIX seconds (time trigger and retention); for tests.

    Example:
        >>> cb = CheckpointCallback("s3://bucket/run", save_every_n_steps=100, max_to_keep=5,
        ...                         keep_checkpoint_every_n_hours=1)
        >>> trainer = Trainer(max_epochs=10, callbacks=[cb])
        >>> trainer.fit(model)                    # resumes from the newest valid checkpoint, if any
        >>> trainer.fit(model, ckpt_path="last")  # the Lightning idiom resolves to the same checkpoint
    """

    _role = "callback"
    # Tests switch this off to show that without the RNG restore a resumed run diverges.
    _restore_rng = True
    _sharded_path = False  # set at setup: the strategy saves through _sharded (every rank writes its shards)
    _best_path = ""  # best_model_path
    _best_looked_up = False  # whether best_model_path read the directory's recorded best

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every_n_steps: int | None = None,
        save_every_n_seconds: float | None = None,
        save_on_epoch_end: bool = False,
        save_on_train_end: bool = True,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = None,
        keep_best: int | None = None,
        monitor: str | None = "val_loss",
        mode: str = "auto",
        save_optimizer: bool = True,
        resume: bool = True,
        async_save: bool = False,
        storage_options: dict | None = None,
        prefix: str = "ckpt",
        allow_pickle: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        config = CallbackConfig.validated(locals())  # the arguments above, checked as the manager does
        super().__init__(save_top_k=0, save_last=False, enable_version_counter=False)
        self._config = config
        # directory, save_every_n_steps, ..., as public attributes (over ModelCheckpoint's); clock as _clock.
        config.apply_to(self)
        self.dirpath = self.directory
        self._resolved_mode = resolve_mode(monitor, mode)

        self._mgr: CheckpointManager | None = None
        self._trainer_ref: Callable[[], Trainer | None] = _no_trainer
        self._global_rank = 0
        self._replaced_io: tuple[Any, Any] | None = None
        # counters (persisted through state_dict)
        self._trigger = config.make_trigger()
        # transient
        self._rng_for_save: list[dict] | None = None  # every rank's RNG states, gathered by _save
        self._epoch_rng: dict | None = None  # RNG states just before this epoch's data iterator was made
        self._epoch_start_seen = False
        self._resume_rng: dict | None = None  # this rank's RNG states of the checkpoint being resumed
        self._resume_consumed = 0  # batches of the interrupted epoch to skip (mid-epoch resume)
        self._best_metric: float | None = None
        # The global step of the last validation in this fit and the metrics it logged: a value
        # measured there ranks (keep_best) only the save of that step, never a later one.
        self._validated: tuple[int, set[str]] | None = None
        self._deferred_to_epoch_end = False
        self._filters = WarningFilters()  # ours in warnings.filters, removed when they no longer apply
        self._last_requested = False  # fit(ckpt_path="last"): resumed by on_fit_start, as resume=True
        self._warned_hparams: set[str] = set()  # hparams left out of the checkpoints, warned once

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for ddp_spawn and for Trainer copies: live resources stay with this process.
        state = self.__dict__.copy()
        state.update(
            _trainer_ref=_no_trainer,
            _mgr=None,
            _replaced_io=None,
            _filters=WarningFilters(),
            _last_requested=False,
        )
        return state

    # ------------------------------------------------------------------ identity and state

    @property
    def state_key(self) -> str:
        # Not the directory: a checkpoint directory copied elsewhere (bucket -> local disk) must
        # still restore the counters, data position and RNG states. Two CheckpointCallbacks in one
        # Trainer need different prefixes.
        return self._generate_state_key(prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        """The callback's counters, the data position and the RNG states of every rank."""
        mid_epoch, consumed = self._position()
        return {
            "version": _STATE_VERSION,
            **self._trigger.state_dict(),  # last_saved_step, last_step_seen, num_saves
            "mid_epoch": mid_epoch,
            "batches_consumed": consumed,
            "rng": self._rng_for_save if self._rng_for_save is not None else [self._local_rng()],
            "best_model_path": self.best_model_path,
            "best_model_score": self._best_metric,
            "last_model_path": self.last_model_path,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._trigger.load_state_dict(state_dict)
        self.best_model_path = state_dict.get("best_model_path") or self.best_model_path
        self.last_model_path = state_dict.get("last_model_path") or self.last_model_path
        score = state_dict.get("best_model_score")
        if isinstance(score, (int, float)) and self.keep_best:
            self._best_metric = float(score)
            self.best_model_score = torch.tensor(float(score))
        rngs = state_dict.get("rng") or []
        self._resume_rng = None
        self._resume_consumed = 0
        if self._restore_rng and rngs:
            self._resume_rng = rngs[self._global_rank] if self._global_rank < len(rngs) else rngs[0]
            if state_dict.get("mid_epoch"):
                self._resume_consumed = int(state_dict.get("batches_consumed") or 0)

    @property
    def best_model_path(self) -> str:
        """The best checkpoint by ``monitor`` (``keep_best``); without ``keep_best``, the newest saved.

        Before this callback ranked a save of its own (a new process, ``trainer.test(ckpt_path="best")``
        before any ``fit``), the best checkpoint the directory records, looked up once.
        """
        if not self._best_path and getattr(self, "keep_best", None) and not self._best_looked_up:
            self._best_looked_up = True
            with contextlib.suppress(CheckpointError, ValueError):
                self._best_path = resolve_checkpoint(
                    self.directory, self.storage_options, verify=False, checkpoint="best"
                )
        return self._best_path

    @best_model_path.setter
    def best_model_path(self, value: str) -> None:
        self._best_path = value

    # ------------------------------------------------------------------ ckpt_path="last"

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        """What ``ckpt_path="last"`` resolves to.

        In ``fit``: nothing; the callback resumes itself in ``on_fit_start`` exactly as ``resume=True``
        does (the newest valid checkpoint, read once, through ``storage_options``; under a sharded
        strategy every rank reads its shards). Lightning would otherwise stat the path it is handed with
        default fsspec options (no endpoint, no credentials of ``storage_options``) and then load it a
        second time. ``trainer.ckpt_path`` still names the checkpoint's ``.index`` file.

        Elsewhere (``validate`` / ``test`` / ``predict``): the newest checkpoint whose index reads,
        loaded by Lightning through the callback's checkpoint IO.
        """
        self._last_requested = False
        state_file = get_checkpoint_state(self.directory, self.storage_options)
        if state_file is None or not state_file.model_checkpoint_path:
            return set()
        if _fn(trainer) == "fit":
            self._last_requested = True
            self._filters.ignore(_NO_LAST_WARNING)
            return set()
        if _sharded.applies(trainer.strategy):
            raise ValueError(_SHARDED_LAST)
        try:
            return {resolve_checkpoint(self.directory, self.storage_options) + INDEX_SUFFIX}
        except CheckpointNotFoundError:
            return set()

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._filters.drop()  # Lightning's "last" resolution is over
        ns = self._check_namespace(trainer)
        self._sharded_path = _sharded.applies(trainer.strategy)
        check_strategy(trainer.strategy, sharded=self._sharded_path)
        self._trainer_ref = weakref.ref(trainer)
        self._global_rank = trainer.global_rank
        self._install_io(trainer, ns)
        if stage == "fit" and self._sharded_path and self._mgr is None:
            self._mgr = _sharded.manager(self)  # on every rank
        if stage == "fit" and trainer.is_global_zero and self._mgr is None:
            # Fail before training, as the Keras callback does: an unwritable local directory.
            _foreign.check_writable(self.directory, self.storage_options)
            self._mgr = self._config.make_manager(
                monitor=self.monitor if self.keep_best else None, mode=self._resolved_mode
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        last, self._last_requested = self._last_requested, False
        if (self.resume or last) and trainer.ckpt_path is None and not trainer.fast_dev_run:
            suffix = INDEX_SUFFIX if last else ""
            _resume.auto_resume(self, trainer, self._mgr, self._sharded_path, shown_suffix=suffix)
        # Exact resume. Lightning makes the train data iterator (drawing the shuffling
        # seed from the global RNG) right after this hook; the sanity check runs in isolate_rng.
        # - Saved at an epoch boundary: restore the RNGs of the save now; the next epoch's iterator
        #   and dropout then draw exactly what the uninterrupted run drew.
        # - Saved mid-epoch: restore the RNGs of that epoch's start, so the iterator reproduces the
        #   epoch's order; on_train_start skips the batches already trained on (the data-position
        #   mechanism) and then restores the RNGs of the save.
        rng = self._resume_rng
        if rng is not None:
            if self._resume_consumed and rng.get("epoch") is not None:
                _rng.restore(rng["epoch"])
            else:
                _rng.restore(rng["save"])
                self._resume_rng = None
        self._epoch_rng = _rng.capture()
        self._epoch_start_seen = False
        self._deferred_to_epoch_end = False
        self._validated = None

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A checkpoint saved with save_optimizer=False: keep the optimizers as configured instead of
        # letting Lightning fail on the missing key.
        if "optimizer_states" not in checkpoint and _fn(trainer) == "fit":
            checkpoint["optimizer_states"] = [opt.state_dict() for opt in trainer.optimizers]
            checkpoint.setdefault(
                "lr_schedulers", [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trigger.start(trainer.global_step)
        if self._resume_rng is not None:
            if self._resume_consumed:
                self._epoch_start_seen = True  # Lightning skips on_train_epoch_start of a resumed epoch
                if _fast_forward(trainer, self._resume_consumed):
                    # Lightning's "dataloader is not resumable" warning (issued before the first
                    # batch) does not apply: the position was restored.
                    self._filters.ignore(_NOT_RESUMABLE_WARNING)
            _rng.restore(self._resume_rng["save"])
            self._resume_rng = None
            self._resume_consumed = 0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._filters.drop()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The first epoch of a fit() got its iterator before on_train_start (captured in
        # on_fit_start); every later epoch makes it right after this hook.
        if self._epoch_start_seen:
            self._epoch_rng = _rng.capture()
        self._epoch_start_seen = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._skip(trainer):
            return
        if not self._sharded_path:  # a sharded async save stages into buffers of its own
            prepare_snapshot_once(self._mgr, lambda: _inplace.snapshot_like(trainer, self.save_optimizer))
        step = trainer.global_step
        time_due = time_due_everywhere(
            trainer, self._trigger, self.save_every_n_seconds
        )  # a collective under DDP: every rank calls it here
        if self._trigger.batch_end(step, time_due=time_due):
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                # Saved here, Lightning (2.6) would count this epoch twice after a second resume (its
                # epoch counters are mid-update); at on_train_epoch_end they are consistent, and no
                # optimizer step happens in between.
                self._deferred_to_epoch_end = True
            else:
                self._save(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        deferred, self._deferred_to_epoch_end = self._deferred_to_epoch_end, False
        if (self.save_on_epoch_end or deferred) and not self._skip(trainer):
            if not self._trigger.is_saved(trainer.global_step):
                self._save(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._skip(trainer):
            return
        step = trainer.global_step
        self._validated = (step, _compat.evaluation_metric_names(trainer))
        # keep_best on a metric measured here: the checkpoint of this step is the one it ranks.
        if self.keep_best and self.monitor in self._validated[1] and not self._trigger.is_saved(step):
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                self._deferred_to_epoch_end = True  # see on_train_batch_end; no step in between
            else:
                self._save(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # No save on failure: the last committed checkpoint is the resume point. Lightning calls no
        # teardown hook after an exception, so release the manager and the strategy's IO here.
        self._release(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._skip(trainer):
            return
        if self.save_on_train_end and not self._trigger.is_saved(trainer.global_step):
            self._save(trainer, pl_module)
        # Surface a failed background save on every rank before fit returns.
        error = None
        if self._mgr is not None:
            try:
                self._mgr.wait_until_finished()
            except Exception as e:  # noqa: BLE001 - broadcast, then raised on every rank
                error = e
        raise_everywhere(trainer, error, "Finishing the background checkpoint saves")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release(trainer)

    def _release(self, trainer: Trainer) -> None:
        if self._replaced_io is not None:
            strategy, original = self._replaced_io
            strategy.checkpoint_io = original
            self._replaced_io = None
        self._resume_rng = None
        self._last_requested = False
        self._filters.drop()
        if self._mgr is not None:
            mgr, self._mgr = self._mgr, None
            try:
                mgr.close()
            except Exception as e:  # noqa: BLE001 - already raised in on_train_end unless fit failed
                _rank_zero(trainer, f"CheckpointCallback: a background save had failed: {e}", warn=True)

    # ------------------------------------------------------------------ internals

    def _skip(self, trainer: Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.sanity_checking or _fn(trainer) != "fit"

    def _position(self) -> tuple[bool, int]:
        trainer = self._trainer_ref()
        return (False, 0) if trainer is None or _fn(trainer) != "fit" else position(trainer)

    def _local_rng(self) -> dict[str, Any]:
        return {"save": _rng.capture(), "epoch": self._epoch_rng}

    def _install_io(self, trainer: Trainer, ns: str) -> None:
        """Let the strategy load our checkpoints (``ckpt_path="last"``, a checkpoint path) with any plugin."""
        strategy = trainer.strategy
        current = strategy.checkpoint_io
        if isinstance(current, (FsspecCheckpointIO, _DispatchingCheckpointIO)):
            return
        try:
            io_class = _compat.bound_class(_DispatchingCheckpointIO, "checkpoint_io", (ns,))
            strategy.checkpoint_io = io_class(current, self.storage_options, self.allow_pickle)
        except (TypeError, ValueError, AssertionError):
            # Strategies that accept only their own IO (XLA): resume=True still works; loading a
            # path of this format through ckpt_path then needs FsspecCheckpointIO as the plugin.
            return
        self._replaced_io = (strategy, current)

    def _save(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        self._trigger.saved(step)  # before the dump: the checkpoint's callback state counts this save
        self._rng_for_save = _gather(trainer, self._local_rng())
        metrics = self._measured_now(_metrics(trainer), step)
        # Tracked before the dump, so that the checkpoint's own callback state names the paths that
        # are right once it is committed (a resume from it then reports existing checkpoints).
        self._track_paths(_join(self.directory, f"{self.prefix}-{step}"), metrics)
        try:
            checkpoint = (_sharded.dump if self._sharded_path else _compat.dump_checkpoint)(trainer)
        finally:
            self._rng_for_save = None
        if not self.save_optimizer:
            checkpoint.pop("optimizer_states", None)
        if self._sharded_path:  # a collective: every rank writes its shards, a failure raises on every rank
            self.last_model_path = _sharded.save(self, checkpoint, step, metrics, _info(trainer, pl_module))
            return
        error = None
        if trainer.is_global_zero:
            try:
                assert self._mgr is not None
                path = self._mgr.save(
                    _convert.to_tree(checkpoint, allow_pickle=self.allow_pickle, warned=self._warned_hparams),
                    step=step,
                    metrics=metrics,
                    _info=_info(trainer, pl_module),
                )
                self.last_model_path = path
            except Exception as e:  # noqa: BLE001 - broadcast, then raised on every rank
                error = e
        raise_everywhere(trainer, error, f"Saving the checkpoint of step {step}")
        if trainer.world_size > 1:
            self.best_model_path, self.last_model_path = trainer.strategy.broadcast(
                (self.best_model_path, self.last_model_path), src=0
            )

    def _measured_now(self, metrics: dict[str, float], step: int) -> dict[str, float]:
        """``metrics`` without ``monitor`` when it was logged by a validation at an earlier step.

        Lightning keeps the last validation's values in ``callback_metrics``; a save between two
        validations that carried them would rank as if measured there and displace the checkpoint
        they were measured at.
        """
        validated = self._validated
        if self.keep_best and validated is not None and self.monitor in validated[1] and validated[0] != step:
            return {k: v for k, v in metrics.items() if k != self.monitor}
        return metrics

    def _track_paths(self, path: str, metrics: dict[str, float]) -> None:
        self.last_model_path = path
        value = metrics.get(self.monitor) if self.keep_best and self.monitor else None
        if value is None:
            if not self.keep_best:
                self.best_model_path = path  # no ranking configured: "best" is the newest
            return
        better = self._best_metric is None or (
            value < self._best_metric if self._resolved_mode == "min" else value > self._best_metric
        )
        if better:
            self._best_metric = value
            self.best_model_path = path
            self.best_model_score = torch.tensor(value)
