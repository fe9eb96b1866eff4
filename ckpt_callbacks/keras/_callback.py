"""``CheckpointCallback``: decides "save now?" from the optimizer's step counter and the clock."""

from __future__ import annotations

import logging
import os
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from .. import _warn
from .._callbacks._callback_config import CallbackConfig, prepare_snapshot_once
from .._manager import _foreign
from .._manager._manager import CheckpointManager
from .._manager._mode import direction_from_name, resolve_mode
from ..errors import IncompatibleCheckpointError
from . import _adapter, _compat, _inplace, _keras_args

# Keras ends an epoch whose input runs out early with this warning; a ResumableDataset does that on
# purpose for the epoch a mid-epoch resume re-enters, so that one warning is silenced for that epoch.
_RAN_OUT_WARNING = "Your input ran out of data"

logger = logging.getLogger("ckpt_callbacks")


class CheckpointCallback(keras.callbacks.Callback):
    """Saves crash-safe checkpoints during ``model.fit`` and resumes from the newest one.

    A checkpoint holds the model variables (including seed-generator states), the optimizer variables
    (including ``iterations``), the position in training (epoch, batches of that epoch already
    consumed, global step), this callback's counters, and the process-global RNG states (Python,
    NumPy, PyTorch, Keras' global seed generator) as they were at the start of the saved epoch. With
    ``resume=True``, ``fit`` continues from the newest valid checkpoint at the saved epoch and global
    step; link a :class:`ResumableDataset` to also continue at the saved batch inside the epoch.

    The defaults (``save_every_n_steps=None``, ``save_every_n_seconds=None``, ``save_on_epoch_end=False``,
    ``save_on_train_end=True``, as the signature has them) save only when ``fit`` returns: a crash before
    then loses the whole run. The constructor keeps those defaults, so that no write happens on a
    schedule the caller did not ask for (a remote bucket is billed per write), and warns instead,
    naming the arguments that add a periodic save.

    Before the first batch, ``on_train_begin`` fails fast: a local directory this process cannot
    create files in raises ``CheckpointWriteError``; a directory holding another tool's checkpoints
    (TensorFlow's ``tf.train.CheckpointManager`` uses the same names) raises
    ``IncompatibleCheckpointError`` and none of its files is touched.

    Args:
        directory: local path or fsspec URL (``"s3://bucket/run"``, ``"gs://bucket/run"``, ...).
        save_every_n_steps: save whenever the global optimizer step (``optimizer.iterations``) crosses
            a multiple of N. With ``steps_per_execution > 1`` Keras reports progress every few steps;
            the save then happens at the first reported step at or past the boundary, once.
        save_every_n_seconds: save at the first batch end at least N seconds after the last save (or
            after the start of training).
        save_on_epoch_end: save at the end of every epoch.
        save_on_train_end: save when ``fit`` returns (skipped when the last save is at the same step).
        max_to_keep: newest N checkpoints kept; ``None`` keeps all.
        keep_checkpoint_every_n_hours: also keep one checkpoint per N hours, forever.
        keep_best: also keep the best K checkpoints by ``logs[monitor]``.
        monitor: the log entry ``keep_best`` ranks by.
        mode: ``"min"`` or ``"max"``: whether a smaller or a larger ``monitor`` is better. ``"auto"`` (the
            default) is Keras' ``ModelCheckpoint`` rule: ``loss`` is minimised; a compiled metric of
            that name follows its own direction (accuracy, AUC, precision, recall, F-scores, IoU, R²
            are maximised); any other name is maximised when it looks like one of those (contains
            ``acc``, ``auc``, ``precision``, ``recall``, ``f1``, ``iou``, ...), else minimised.
        save_optimizer: include the optimizer variables. Without them a resume restarts the optimizer's
            slots but keeps the global step.
        resume: at train start, restore the newest valid checkpoint in ``directory`` (if any).
        async_save: ``fit`` waits only for an in-memory copy; files are written in the background.
            ``fit`` returns once every save is durable.
        storage_options: passed to fsspec (credentials, endpoint, ...).
        prefix: checkpoint names are ``f"{prefix}-{step}"``.
        allow_pickle: store (and load) state leaves that are not plain tree types with pickle; off by
            default, so that loading never executes code.
        clock: zero-argument callable returning POSIX seconds, read for ``save_every_n_seconds`` and
            for retention timestamps; tests inject a fake one.
        save_freq: Keras' spelling of the triggers (``keras.callbacks.ModelCheckpoint``,
            ``OrbaxCheckpoint``): ``"epoch"`` is ``save_on_epoch_end=True``, an int N is
            ``save_every_n_steps=N``. Combined with a ``save_every_n_steps`` that says otherwise, it
            raises ValueError.
        save_best_only: as in Keras' ``ModelCheckpoint``: a save (step, epoch end or train end) is
            made only when ``logs[monitor]`` is strictly better (by ``mode``) than at every earlier
            save of the run; a save whose logs lack ``monitor`` is made, with a warning, as Keras does.
            The best value travels in the checkpoint, so a resumed run keeps comparing with it.
        initial_value_threshold: with ``save_best_only``, the value the first save must beat.

    A save whose step ends an epoch is written in ``on_epoch_end`` instead of after the batch, so it
    carries that epoch's validation metrics and resumes at the start of the next epoch. When
    ``keep_best`` or ``save_best_only`` monitors a validation metric (``val_*``), every epoch whose
    validation ran also ends with a save, carrying that value: checkpoints are ranked only on values
    measured at their own step (a step save between validations carries none).

    Attributes:
        last_checkpoint: path of the newest checkpoint this callback wrote, or None.
        restored_from: path of the checkpoint the last ``fit`` resumed from, or None.
        manager: the ``CheckpointManager`` behind the callback (created on first use, closed when
            ``fit`` ends; after a ``fit`` that raised, when the next ``fit`` with this callback begins).

    Example:
        >>> cb = CheckpointCallback("gs://bucket/run", save_every_n_steps=500, max_to_keep=3,
        ...                         keep_checkpoint_every_n_hours=1)   # example values, not defaults
        >>> model.fit(x, y, epochs=10, callbacks=[cb])   # rerun after a crash: continues where it stopped
    """

    _repeats_epoch_silently = False  # a resume inside an epoch without a ResumableDataset warns

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
        monitor: str = "val_loss",
        mode: str = "auto",
        save_optimizer: bool = True,
        resume: bool = True,
        async_save: bool = False,
        storage_options: dict | None = None,
        prefix: str = "ckpt",
        allow_pickle: bool = False,
        clock: Callable[[], float] = time.time,
        save_freq: str | int | None = None,
        save_best_only: bool = False,
        initial_value_threshold: float | None = None,
    ) -> None:
        super().__init__()
        save_every_n_steps, save_on_epoch_end = _keras_args.triggers(
            save_freq, save_every_n_steps, save_on_epoch_end
        )
        _keras_args.check_best_only(save_best_only, initial_value_threshold, monitor)
        self._config = CallbackConfig.validated(locals())  # the arguments above, checked as the manager does
        self.save_freq, self.save_best_only = save_freq, save_best_only
        self.initial_value_threshold = initial_value_threshold
        if save_every_n_steps is None and save_every_n_seconds is None and not save_on_epoch_end:
            _warn.warn(
                "CheckpointCallback saves only when fit returns (save_every_n_steps=None, "
                "save_every_n_seconds=None, save_on_epoch_end=False): a crash before then loses the whole "
                "run. Add a periodic save, e.g. save_every_n_steps=1000, save_every_n_seconds=600 or "
                "save_on_epoch_end=True.",
                UserWarning,
            )
        # directory, save_every_n_steps, ..., as public attributes; the clock (retention timestamps and
        # save_every_n_seconds) as _clock.
        self._config.apply_to(self)
        self._resolved_mode = resolve_mode(monitor, mode)
        self._manager: CheckpointManager | None = None
        self._datasets: list[weakref.ref] = []
        self._info: dict[str, Any] = {}
        self._reset_counters()
        self.last_checkpoint: str | None = None
        self.restored_from: str | None = None

    def _reset_counters(self) -> None:
        self._epoch = 0  # epoch in progress (or the next one, between epochs)
        self._offset = 0  # batches of the current epoch skipped by a mid-epoch resume
        self._consumed = 0  # batches of the current epoch done, offset included
        # Steps / seconds since the last save; the step saved last (never saved twice); saves made.
        self._trigger = self._config.make_trigger()
        self._pending_epoch_save = False
        self.best: float | None = self.initial_value_threshold  # save_best_only: the value to beat
        self._declined_step: int | None = None  # save_best_only: the step judged no improvement
        self._resume_epoch: int | None = None
        self._resume_skip = 0
        self._epoch_rng: dict | None = None
        self._warn_ctx: Any = None
        self._exhaust_guard: list | None = None
        self._rng_after_skip: dict | None = None
        self._saved_initial_epoch: Any = None
        self._initial_epoch_set = False
        self._initial_epoch_model: Any = None

    # ------------------------------------------------------------------ wiring

    def _attach_dataset(self, dataset: Any) -> None:
        self._datasets.append(weakref.ref(dataset))

    def _live_datasets(self) -> list:
        return [d for d in (r() for r in self._datasets) if d is not None]

    def _global_step(self) -> int:
        opt = getattr(self.model, "optimizer", None)
        if opt is None:
            return self._trigger.last_step_seen
        return int(keras.ops.convert_to_numpy(opt.iterations.value))

    def _steps_per_epoch(self) -> int | None:
        steps = (self.params or {}).get("steps")
        return int(steps) if steps else None

    @property
    def manager(self) -> CheckpointManager:
        """The CheckpointManager writing this callback's checkpoints (created on first use)."""
        if self._manager is None:
            # save_best_only ranks its saves too, so that checkpoint="best" names the best one.
            keep_best = self.keep_best or (1 if self.save_best_only else None)
            shards = _adapter.jax_shards()
            extra = shards.process_manager_kwargs(self.directory, self.storage_options) if shards else {}
            self._manager = self._config.make_manager(mode=self._resolved_mode, keep_best=keep_best, **extra)
        return self._manager

    # ------------------------------------------------------------------ Keras hooks

    def on_train_begin(self, logs: dict | None = None) -> None:
        # Keras calls no hook when fit raises: whatever a failed fit of this callback left behind (its
        # manager, whose view of the directory is now stale, the warning filter, the initial epoch) is
        # released here, so this fit opens a new manager and resumes from what is on storage.
        self._release_previous_fit()
        self._reset_counters()
        self.restored_from = None
        self._info = _adapter.framework_info(self.model)
        self._resolved_mode = self._mode_for(self.model)
        # Fail before the first batch, not at the first save: an unwritable directory, or one holding
        # another tool's checkpoints (the manager's constructor refuses it).
        _foreign.check_writable(self.directory, self.storage_options)
        self.manager  # noqa: B018 - constructed here, so that check runs before training
        # A model without variables yet (subclassed, or Sequential without an Input) is built by Keras'
        # TensorFlow trainer only when the first train step is traced; building the optimizer now would
        # tie it to an empty variable list. Keras builds the optimizer itself in that case.
        built = _adapter.is_built(self.model)
        if built:
            _adapter.ensure_optimizer_built(self.model)
        self._trigger.start(self._global_step())
        if self.resume:
            path, state = _inplace.restore_with_path(self.manager, self.model, self.storage_options)
            if state is not None:
                if not built:
                    self._release_manager()
                    raise ValueError(
                        f"Cannot resume from {path!r}: the model is not built when training begins (it has "
                        f"no variables yet to restore into). Received: model={self.model.name!r}, unbuilt. "
                        "Keras' TensorFlow trainer builds a subclassed model or a Sequential model without "
                        "an Input only at the first train step, after the callback has to resume. Build the "
                        "model before fit: model.build(input_shape), a keras.Input(...) as its first layer, "
                        "or call it once on a batch (model(x[:1])). To start over instead, pass resume=False "
                        "or another directory."
                    )
                try:
                    self._apply_resume(state)
                except IncompatibleCheckpointError as e:
                    self._release_manager()
                    raise IncompatibleCheckpointError(
                        f"Cannot resume from {path!r}: {e} To train this model from scratch instead, pass "
                        "resume=False or use a new directory."
                    ) from e
                self.restored_from = path
                trainer = state.get(_adapter.TRAINER_KEY) or {}
                logger.info(
                    "CheckpointCallback resumed from %s: epoch %d, %d batch(es) of it already done, global step %d",
                    path,
                    int(trainer.get("epoch", 0)),
                    int(trainer.get("batches_in_epoch", 0)),
                    int(trainer.get("global_step", 0)),
                )
                self._warn_if_nothing_to_train(path)

    def _mode_for(self, model: Any) -> str:
        """``mode`` with ``"auto"`` resolved as Keras' ModelCheckpoint does (see the class doc)."""
        if self.mode != "auto":
            return self.mode
        name = self.monitor.removeprefix("val_")
        if name == "loss":
            return "min"
        return _compat.metric_direction(model, name) or direction_from_name(self.monitor)

    def _warn_if_nothing_to_train(self, path: str) -> None:
        epochs = (self.params or {}).get("epochs")
        if epochs is None or self._epoch < int(epochs):
            return
        _warn.warn(
            f"CheckpointCallback resumed from {path!r} at epoch {self._epoch} (global step "
            f"{self._trigger.last_saved_step}), at or past fit(epochs={epochs}): this fit trains nothing. `epochs` "
            "counts from the start of the run, not from the resume. To train further, raise `epochs` "
            f"(e.g. epochs={self._epoch + int(epochs)}); to start over, pass resume=False or another directory."
        )

    def _apply_resume(self, state: dict) -> None:
        _adapter.restore_model_state(self.model, state)
        trainer = state.get(_adapter.TRAINER_KEY) or {}
        step = int(trainer.get("global_step", 0))
        opt = getattr(self.model, "optimizer", None)
        if opt is not None and _adapter.OPTIMIZER_KEY not in state:
            opt.iterations.assign(step)  # no optimizer state saved: keep counting steps from the checkpoint
        epoch, consumed = int(trainer.get("epoch", 0)), int(trainer.get("batches_in_epoch", 0))
        rng = state.get(_adapter.RNG_KEY) or {}
        if consumed and self._live_datasets():
            self._rng_after_skip = rng.get("at_save")  # see on_train_batch_begin
        elif consumed:
            _adapter.restore_rng(rng.get("epoch_begin"))
        else:
            _adapter.restore_rng(rng.get("at_save"))
        self._epoch = epoch
        self._trigger.resumed(step, int(trainer.get("save_count", 0)))
        if self.save_best_only and trainer.get("best") is not None:
            self.best = float(trainer["best"])
        if consumed:
            if self._live_datasets():
                self._resume_epoch, self._resume_skip = epoch, consumed
            elif not self._repeats_epoch_silently:
                _warn.warn(
                    f"Resuming inside epoch {epoch} at global step {step}: the {consumed} batches of that epoch "
                    "seen before the checkpoint will be seen again, because the input pipeline's position is "
                    "not restorable. For an exact mid-epoch resume, feed fit() a "
                    "ckpt_callbacks.keras.ResumableDataset(..., callback=cb)."
                )
        # Keras' fit reads model._initial_epoch right after on_train_begin (as BackupAndRestore uses it).
        self._saved_initial_epoch = _compat.get_initial_epoch(self.model)
        self._initial_epoch_set = True
        self._initial_epoch_model = self.model
        _compat.set_initial_epoch(self.model, epoch)

    def _unset_initial_epoch(self) -> None:
        # Only this fit resumes: a later fit on the same model must not start at the restored epoch.
        if self._initial_epoch_set:
            _compat.set_initial_epoch(self._initial_epoch_model, self._saved_initial_epoch)
            self._initial_epoch_set = False
            self._initial_epoch_model = None

    def _release_previous_fit(self) -> None:
        self._restore_warnings()
        self._unset_initial_epoch()
        try:
            self._release_manager()
        except Exception as e:  # noqa: BLE001 - the fit that started this save has already failed
            _warn.warn(
                f"CheckpointCallback: a background save of the previous, failed fit had failed too: {e}"
            )

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._unset_initial_epoch()
        offset = self._resume_skip if epoch == self._resume_epoch else 0
        self._resume_epoch, self._resume_skip = None, 0
        self._epoch, self._offset, self._consumed = epoch, offset, offset
        datasets = self._live_datasets()
        for ds in datasets:
            ds._set_position(epoch, offset)
        if datasets:
            # An epoch a resume re-enters runs fewer batches, and Keras' loaders draw from the global
            # RNGs a different number of times then; seeding every epoch from (seed, epoch) makes what
            # follows independent of how the previous epoch ended.
            _adapter.seed_rng(datasets[0].seed, epoch)
        self._epoch_rng = _adapter.capture_rng()
        if offset:
            self._warn_ctx = warnings.catch_warnings()
            self._warn_ctx.__enter__()
            warnings.filterwarnings("ignore", message=_RAN_OUT_WARNING)

    def _restore_warnings(self) -> None:
        if self._warn_ctx is not None:
            self._warn_ctx.__exit__(None, None, None)
            self._warn_ctx = None

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self._rng_after_skip is not None:
            # The resumed epoch's loader has been created and its first batch fetched; the random ops of
            # the next train step must draw from the states the interrupted run had at the checkpoint.
            rng, self._rng_after_skip = self._rng_after_skip, None
            _adapter.restore_rng(rng)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        prepare_snapshot_once(self._manager, lambda: _adapter.model_state(self.model, self.save_optimizer))
        steps = self._steps_per_epoch()
        self._consumed = self._offset + int(batch) + 1
        if steps is not None:
            self._consumed = min(self._consumed, steps)
            if self._offset and self._consumed == steps and self._exhaust_guard is None:
                self._exhaust_guard = _snapshot_variables(self.model)
        step = self._global_step()
        if not self._trigger.batch_end(step):
            return
        if steps is not None and self._consumed >= steps:
            self._pending_epoch_save = True  # the epoch ends here: save in on_epoch_end (see class doc)
        else:
            self._save_if_best(step, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._restore_warnings()
        if self._exhaust_guard is not None:
            # The epoch a mid-epoch resume re-enters ends when its input runs out. On TensorFlow the
            # train function that hits the end still runs its data-independent ops (the optimizer's
            # iteration counter, seed-generator states) before raising; undo them, so the state
            # equals that of an uninterrupted run.
            guard, self._exhaust_guard = self._exhaust_guard, None
            _adapter.assign_pairs(guard)
        self._epoch, self._offset, self._consumed = epoch + 1, 0, 0
        if self.save_on_epoch_end or self._pending_epoch_save or self._validated(logs):
            self._pending_epoch_save = False
            step = self._global_step()
            if not self._trigger.is_saved(step):
                self._save_if_best(step, logs)

    def _validated(self, logs: dict | None) -> bool:
        """Whether this epoch's logs carry a validation value ``keep_best`` / ``save_best_only`` ranks."""
        ranked = self.keep_best or self.save_best_only
        return bool(ranked) and self.monitor.startswith("val_") and self.monitor in (logs or {})

    def on_train_end(self, logs: dict | None = None) -> None:
        self._restore_warnings()
        self._unset_initial_epoch()
        for ds in self._live_datasets():
            ds._set_position(self._epoch, 0)
        try:
            step = self._global_step()
            due = self.save_on_train_end or self._pending_epoch_save
            # A model that trained no step may still be unbuilt: there is nothing to save then.
            if due and not self._trigger.is_saved(step) and _adapter.is_built(self.model):
                self._save_if_best(step, logs)
        finally:
            self._release_manager()  # waits for background saves: fit returns with every checkpoint durable

    def _release_manager(self) -> None:
        if self._manager is not None:
            manager, self._manager = self._manager, None
            manager.close()

    # ------------------------------------------------------------------ saving

    def _save_if_best(self, step: int, logs: dict | None) -> str | None:
        """``_save``, or under ``save_best_only`` nothing unless ``logs[monitor]`` improved (Keras' rule)."""
        if self.save_best_only:
            if step == self._declined_step:  # judged already (an epoch end, then the train end)
                return None
            current = _scalar_logs(logs).get(self.monitor)
            if current is None:
                _warn.warn(
                    f"Can save best model only with {self.monitor} available: saving at step {step} without "
                    f"comparing (logs: {sorted(logs or {})}). Log {self.monitor!r} (e.g. pass validation "
                    "data), change monitor, or save only at epoch ends (save_freq='epoch')."
                )
            elif not _keras_args.improved(current, self.best, self._resolved_mode):
                self._declined_step = step
                return None
            else:
                previous, self.best = self.best, current  # the checkpoint records its own value as best
                try:
                    return self._save(step, logs)
                except BaseException:
                    self.best = previous
                    raise
        return self._save(step, logs)

    def _save(self, step: int, logs: dict | None) -> str:
        state = _adapter.model_state(self.model, self.save_optimizer)
        # Two moments: now (for random ops inside the train step, e.g. unseeded dropout on PyTorch) and
        # the start of this epoch (input pipelines draw their epoch order then; a resume without a
        # ResumableDataset re-enters the epoch from its start and needs that state).
        state[_adapter.RNG_KEY] = {
            "at_save": _adapter.capture_rng(),
            "epoch_begin": self._epoch_rng if self._consumed else None,
        }
        state[_adapter.TRAINER_KEY] = {
            "epoch": self._epoch,
            "batches_in_epoch": self._consumed,
            "global_step": step,
            "steps_per_epoch": self._steps_per_epoch(),
            "save_count": self._trigger.num_saves + 1,
        }
        if self.save_best_only:
            state[_adapter.TRAINER_KEY]["best"] = self.best
        path = self.manager.save(
            state, step, metrics=_scalar_logs(logs), _info={**self._info, "epoch": self._epoch}
        )
        self._trigger.saved(step)
        self.last_checkpoint = path
        return path


def _snapshot_variables(model: Any) -> list[tuple[Any, np.ndarray]]:
    opt = getattr(model, "optimizer", None)
    variables = list(model.variables) + (list(opt.variables) if opt is not None else [])
    if keras.backend.backend() == "jax":  # immutable arrays: kept as they are (a sharded one cannot be read)
        return [(v, v.value) for v in variables]
    return [(v, _adapter._variable_array(v).copy()) for v in variables]


def _scalar_logs(logs: dict | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (logs or {}).items():
        try:
            a = np.asarray(keras.ops.convert_to_numpy(v))
        except Exception:  # noqa: BLE001 - logs may carry anything; only scalars are metrics
            continue
        if a.ndim == 0 and a.dtype.kind in "iuf":
            out[str(k)] = float(a)
    return out
