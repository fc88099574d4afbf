"""``medt-train``: train a MedT-family model with ``model.fit`` and the official recipe.

    medt-train --config gated_hela              # the README's demo
    medt-train --config medt_hela --epochs 5    # any config field can be overridden
    medt-train --config medt_hela --resume      # continue a killed run where it stopped

A run writes into its output directory (default ``runs/<config>``):
``log.csv`` (one row per epoch), ``run_state.npz`` or, for multi-process
runs and remote output directories, the Orbax checkpoint ``run_state/``
(everything resuming needs, saved after every epoch and every
``save_every_steps`` steps, so that a kill leaves the previous save's;
``checkpoint_format``; a SIGTERM saves at the next step and exits with
status 75, ``training.preemption``), ``best.weights.h5`` (best
validation F1), ``checkpoints/epoch_NNNN.weights.h5`` (every
``checkpoint_every`` epochs), and after training ``model.keras`` (the best
weights), ``test_metrics.json`` and ``test_predictions.png``.

Validation and test follow ``eval_protocol``: ``tiled`` runs the
sliding-window inference of ``medt-predict`` on each whole image and pools
the metrics over the split's pixels (``training.whole_image``); ``resize``
runs ``model.evaluate`` on images resized to the model's size. A pooled
F1/IoU with no foreground anywhere is NaN in the logs and ``null`` in
``test_metrics.json``, never 1.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time

import medt_keras  # noqa: F401  (selects the JAX backend before keras is imported)
from training import files

import numpy as np

import keras

from medt_keras.datasets import DatasetError, load
from medt_keras.models.registry import get_spec
from training import checkpoint, devices, distribution, preemption
from training.config import TrainConfig, apply_overrides, config_names, load_config, parser_with_overrides
from training.data import EpochTail, SegmentationBatches
from medt_keras.metrics import ForegroundF1, ForegroundIoU, json_safe
from medt_keras.optimizers import OfficialAdam
from training.evaluate import evaluate_test, evaluate_test_tiled
from training.whole_image import WholeImageValidation, resolve_protocol, whole_image_scores

SPLITS = ("train", "validation", "test")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def gate_variables(model):
    return [v for v in model.trainable_variables if v.path.rsplit("/", 1)[-1].startswith("gate_")]


class GateSchedule(keras.callbacks.Callback):
    """Holds the gates still before ``unfreeze_epoch`` (official: frozen until epoch index 10 has finished)."""

    def __init__(self, optimizer, gates, unfreeze_epoch):
        super().__init__()
        self.optimizer, self.gates, self.unfreeze_epoch = optimizer, gates, unfreeze_epoch

    def apply(self, epoch):
        if epoch >= self.unfreeze_epoch:
            self.optimizer.unfreeze(self.gates)
        else:
            self.optimizer.freeze(self.gates)

    def on_epoch_begin(self, epoch, logs=None):
        self.apply(epoch)


class EpochData(keras.callbacks.Callback):
    """Tells the training batches which epoch it is, so order and flips follow (seed, epoch)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.epoch = epoch


class StepNaNCheck(keras.callbacks.Callback):
    """Opt-in (``nan_check_each_step``): stops at the first non-finite step loss and names its batch.

    ``float(loss)`` waits for the step on the device every step; without
    this callback the run checks the epoch's mean loss instead.
    """

    def __init__(self, keeper):
        super().__init__()
        self.keeper = keeper

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            # Counted from the epoch's start, also in an epoch resumed at a later batch.
            self.keeper.diverged = (self.keeper._epoch, self.keeper._offset + batch, float(loss))
            self.model.stop_training = True


class RunKeeper(keras.callbacks.Callback):
    """Saves the run: after each completed epoch, every ``save_every_steps`` steps, and at a preemption.

    After each epoch: best and periodic weights, the resumable state, the
    CSV log. Inside an epoch (``save_every_steps``, or the step at which a
    SIGTERM is answered: ``training.preemption``): the resumable state
    alone, with the epoch's metric sums so far, so that a resumed run
    continues at the next batch and logs the epoch an uninterrupted run
    would have logged.

    A NaN or infinite loss stops training before the next save, so the last
    good state stays on disk. The check reads the epoch's mean loss (NaN or
    infinite if any step's was) when saving: no reading every batch, so
    Keras dispatches steps without waiting for the device.
    """

    def __init__(self, directory, optimizer, config, meta, test_scores=None, state_store=None, steps_per_epoch=1,
                 watch=None):
        super().__init__()
        self.directory, self.optimizer, self.config, self.meta = directory, optimizer, config, meta
        self.state_store = state_store  # checkpoint.OrbaxRunState, or None for run_state.npz
        self.test_scores = test_scores  # model -> {"f1", "iou", ...}, or None
        self.steps_per_epoch, self.watch = steps_per_epoch, watch
        self.diverged = None  # (epoch index, batch index or None, loss)
        # A run resumed inside an epoch: that epoch's first batches were done before.
        self._resumed_epoch = meta["next_epoch"] if meta["next_batch"] else None
        self._offset = 0
        self._step = self._last_saved = meta["step"]  # optimizer steps done, and at the last save
        self._preempt_at_epoch_end = False
        self._epoch = 0
        self._started = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._started = time.time()
        self._offset = 0
        if epoch == self._resumed_epoch:
            self._offset = self.meta["next_batch"]
            self._started -= self.meta.get("epoch_seconds", 0.0)
            _restore_metrics(self.model, self.meta["epoch_metrics"])

    def on_train_batch_end(self, batch, logs=None):
        if self.watch is not None:
            self.watch.training()  # from the first step done on: compilation is behind
        done = self._offset + batch + 1  # steps of this epoch done (batch: the last of this call's steps)
        step = self._epoch * self.steps_per_epoch + done
        preempt = self.watch is not None and self.watch.should_save(self._step + 1, step)
        self._step = step
        every = self.config.save_every_steps
        periodic = bool(every) and step // every > self._last_saved // every
        if done >= self.steps_per_epoch:
            # The epoch's end saves anyway, after validation; a preemption exits there.
            self._preempt_at_epoch_end |= preempt
            return
        if not (preempt or periodic):
            return
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            self.diverged = (self._epoch, None, loss)
            self.model.stop_training = True
            return
        self.meta.update(next_batch=done, step=step, epoch_seconds=round(time.time() - self._started, 2),
                         epoch_metrics=_metric_values(self.model))
        self._save_state()
        if preempt:
            raise preemption.Preempted(step)

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if self.diverged is None and loss is not None and not math.isfinite(float(loss)):
            self.diverged = (epoch, None, float(loss))
            self.model.stop_training = True
        if self.diverged is not None:
            return
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if self.test_scores is not None:
            # Reported only, never used for choosing: the official table evaluated the test set every epoch.
            results = self.test_scores(self.model)
            logs.update(test_f1=float(results["f1"]), test_iou=float(results["iou"]))
        row = {"epoch": epoch + 1, **logs, "seconds": round(time.time() - self._started, 2)}
        self.meta["history"].append(row)
        score = logs.get("val_f1")
        # NaN (no foreground in the validation split) never counts as an improvement.
        improved = score is not None and math.isfinite(score) and score > self.meta["best_val_f1"]
        if improved:
            self.meta["best_val_f1"], self.meta["best_epoch"] = score, epoch + 1
        self.meta.update(next_epoch=epoch + 1, next_batch=0, step=(epoch + 1) * self.steps_per_epoch)
        self.meta.pop("epoch_metrics", None)
        self.meta.pop("epoch_seconds", None)
        if improved:
            checkpoint.save_weights(self.model, os.path.join(self.directory, "best.weights.h5"))
        if (epoch + 1) % self.config.checkpoint_every == 0 or epoch + 1 == self.config.epochs:
            checkpoint.save_weights(
                self.model, os.path.join(self.directory, "checkpoints", f"epoch_{epoch + 1:04d}.weights.h5")
            )
        # The run state is the commit point: a kill before it is committed
        # leaves the previous save's (the files above are rewritten
        # identically when the epoch is redone); log.csv is derived from it
        # and rewritten on resume, should a kill come between the two.
        self._save_state()
        checkpoint.atomic_write_csv(os.path.join(self.directory, "log.csv"), self.meta["history"])
        if self._preempt_at_epoch_end or (self.watch is not None and self.watch.pending()):
            raise preemption.Preempted(self.meta["step"])

    def _save_state(self):
        if self.state_store is not None:
            self.state_store.save(self.model, self.optimizer, self.meta)  # every process, in the background
        else:
            checkpoint.save_run_state(self.directory, self.model, self.optimizer, self.meta)
        self._last_saved = self.meta["step"]


def _metric_values(model):
    """The compiled metrics' running sums (loss mean, F1/IoU counts) as JSON: small, and exact through float repr."""
    return dict(paths=[v.path for v in model.metrics_variables],
                values=[np.asarray(v.numpy()).tolist() for v in model.metrics_variables])


def _restore_metrics(model, saved):
    variables = model.metrics_variables
    if [v.path for v in variables] != saved["paths"]:
        raise ValueError(f"the saved run's metric variables ({len(saved['paths'])}) differ from this run's "
                         f"({len(variables)}); resume with the same config.")
    for variable, value in zip(variables, saved["values"]):
        variable.assign(np.asarray(value, dtype=variable.dtype))


def build_model(config, in_channels, normalize="auto"):
    """The config's model; ``normalize`` (how the dataset's raw files become floats) is saved with it."""
    return get_spec(config.model).model_class(
        img_size=config.img_size,
        in_channels=in_channels,
        num_classes=config.num_classes,
        gates_trainable=True,
        dtype=config.dtype,
        rematerialize=config.rematerialize,
        preprocessing=dict(channel_order=config.channel_order, normalize=normalize),
        **config.model_args,
    )


def build_for_training(config, in_channels, normalize="auto"):
    """``(model, optimizer)``: the config's model compiled with ``OfficialAdam``, the optimizer built."""
    model = build_model(config, in_channels, normalize)
    optimizer = OfficialAdam(learning_rate=config.learning_rate, l2=config.weight_decay)
    compile_model(model, config.num_classes, optimizer, steps_per_execution=config.steps_per_execution)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def segmentation_loss(model):
    """Sparse cross-entropy on logits, in float64 for a float64 model.

    A Keras loss computes in Keras' float type (float32) whatever the
    model's dtype: a float64 model's loss, and every gradient through it,
    would be rounded to float32 (its mean over the pixels then depends on
    the order of the sum, e.g. per device or not, at about 1e-6).
    """
    # The models take their dtype per layer (the Model's own policy stays
    # float32), so the dtype of the logits is what counts.
    outputs = getattr(model, "outputs", None)
    logits_dtype = outputs[0].dtype if outputs else model.compute_dtype
    dtype = "float64" if keras.backend.standardize_dtype(logits_dtype) == "float64" else None
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype)


def compile_model(model, num_classes, optimizer=None, steps_per_execution=1):
    """Compile ``model``: sparse cross-entropy on logits, foreground F1 and IoU as *weighted* metrics.

    The metrics go under ``weighted_metrics``: Keras hands ``sample_weight``
    only to those (``metrics=`` get ``update_state(y_true, y_pred)`` and no
    weights), and the padded evaluation batches (``pad_remainder``) mark
    their copies by weight 0. Under ``metrics=`` the copies counted as real
    examples and val/test F1 and IoU were those of a different split. The
    logged names stay ``f1``/``iou`` (``val_f1``/``val_iou``).
    """
    model.compile(
        optimizer="rmsprop" if optimizer is None else optimizer,
        loss=segmentation_loss(model),
        weighted_metrics=[ForegroundF1(num_classes), ForegroundIoU(num_classes)],
        steps_per_execution=steps_per_execution,
    )
    return model


def make_batches(config, sources, process_index=0, process_count=1, distributed=False):
    """``(train, validation, test)`` ``SegmentationBatches`` of the config.

    Every batch of a split has the same shape, so each phase compiles one
    program: training drops a last partial batch (a fresh permutation each
    epoch, so no example is always left out), evaluation pads it with
    zero-weight copies. ``distributed`` is kept for callers; batches are
    built this way for every run.
    """
    missing = [s for s in SPLITS if s not in sources]
    if missing:
        raise DatasetError(f"{config.dataset}: no {', '.join(missing)} split (has: {', '.join(sources)}).")
    common = dict(image_size=config.img_size, channel_order=config.channel_order, seed=config.seed,
                  process_index=process_index, process_count=process_count, workers=config.loader_workers,
                  loader=config.loader)
    # Full batches only: data-parallel batches must also divide over the devices.
    train = SegmentationBatches(
        sources["train"], config.batch_size, shuffle=True, flip_probability=config.flip_probability,
        crop_size=config.crop_size, foreground_fraction=config.foreground_fraction,
        limit=config.max_train_examples, drop_remainder=True,
        examples_per_epoch=config.examples_per_epoch, name=f"{config.dataset} train", **common,
    )
    validation = SegmentationBatches(
        sources["validation"], config.batch_size, limit=config.max_eval_examples, pad_remainder=True,
        name=f"{config.dataset} validation", **common,
    )
    test = SegmentationBatches(
        sources["test"], config.batch_size, limit=config.max_eval_examples, pad_remainder=True,
        name=f"{config.dataset} test", **common
    )
    return train, validation, test


# Fields a resumed run may change: they do not change what is computed.
RESUME_MAY_CHANGE = ("epochs", "output_dir", "rematerialize", "steps_per_execution", "loader", "loader_workers",
                     "nan_check_each_step", "checkpoint_format", "save_every_steps")


def _resolve_resume(config, directory, resume):
    """The config to run: on resume the saved one, but for the fields of ``RESUME_MAY_CHANGE``."""
    saved = checkpoint.read_run_state(directory)
    if saved is None:
        if resume:
            print(f"medt-train: no run state in {directory}; starting from the beginning.", flush=True)
        return config, None
    if not resume:
        raise SystemExit(
            f"medt-train: {directory} already holds a run (epoch {saved['next_epoch']} done). "
            "Pass --resume to continue it, or --output-dir for a new run."
        )
    saved_config = TrainConfig(**saved["config"])
    differences = [
        f"{f.name}: saved {getattr(saved_config, f.name)!r}, now {getattr(config, f.name)!r}"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RESUME_MAY_CHANGE and getattr(saved_config, f.name) != getattr(config, f.name)
    ]
    if differences:
        raise SystemExit(
            f"medt-train: --resume with a config that differs from the saved run in {directory}: "
            + "; ".join(differences)
        )
    changes = {name: getattr(config, name) for name in RESUME_MAY_CHANGE}
    return dataclasses.replace(saved_config, **changes), saved


def train(config, resume=False, verbose="auto", multi_process=None, require_accelerator=False):
    """Trains, evaluates on the test split and writes the run's files; returns the test report (a dict).

    ``multi_process``: ``configure`` arguments of ``training.distribution``
    for a multi-host run (``coordinator_address``, ``num_processes``,
    ``process_id``, ``cloud_tpu``). ``require_accelerator``: raise
    ``training.devices.AcceleratorError`` if JAX finds only CPUs.

    A SIGTERM while it runs saves and raises ``training.preemption.Preempted``
    or exits the process with ``preemption.PREEMPTED`` (the module says
    which, when); the caller's SIGTERM handler is back when it returns.
    """
    with preemption.SigtermWatch() as watch:
        run = _set_up(config, resume, multi_process, require_accelerator, watch)
        try:
            train_seconds = _fit(run, verbose, watch)
            watch.finishing()
            return _finish(run, train_seconds)
        finally:
            for batches in run.batches:
                batches.close()  # the loader's threads or worker processes


@dataclasses.dataclass
class _Run:
    """What the three phases of ``train`` share."""

    config: TrainConfig
    directory: str  # the run's output folder
    write_dir: str  # where this process writes (a scratch folder for processes other than 0)
    chief: bool
    process_count: int
    device_count: int
    started: float
    batches: tuple  # (train, validation, test) SegmentationBatches
    in_channels: int
    protocol: str  # "tiled" or "resize"
    model: keras.Model
    optimizer: OfficialAdam
    gates: GateSchedule
    meta: dict  # the run's bookkeeping, saved with the run state
    state_format: str  # "npz" or "orbax" (training.checkpoint)


def _set_up(config, resume, multi_process, require_accelerator, watch):
    """Devices, data, the compiled model and, on resume, the saved state."""
    directory = config.output_dir or os.path.join("runs", "run")
    config = dataclasses.replace(config, output_dir=directory)
    # First: a multi-process run must initialise before JAX starts, and
    # reading an Orbax run state starts it. A resume cannot change these fields.
    process_index, process_count, device_count = distribution.configure(
        config.distribution, config.batch_size, **(multi_process or {})
    )
    watch.distributed(process_count)
    devices.check("medt-train", require_accelerator)
    config, saved = _resolve_resume(config, directory, resume)
    if config.dtype == "float64":
        medt_keras.enable_float64()
    state_format = checkpoint.choose_format(directory, config.checkpoint_format, process_count)
    chief = process_index == 0
    files.makedirs(directory)
    if chief and not checkpoint.is_remote(directory):
        checkpoint.remove_stale_temporaries(directory)  # half-written files of a killed run
    # Saving gathers replicated variables, a collective every process must
    # join; processes other than 0 write to a scratch folder, deleted at the end.
    write_dir = directory if chief else tempfile.mkdtemp(prefix=f"medt-train-process{process_index}-")
    started = time.time()

    keras.utils.set_random_seed(config.seed)
    sources = _load_prepared_once(config, process_index, process_count)
    train_batches, validation_batches, test_batches = make_batches(
        config, sources, process_index, process_count, distributed=config.distribution != "none"
    )
    first_image = np.asarray(sources["train"][0]["image"])
    in_channels = int(first_image.shape[-1])
    # uint8 files are divided by 255; datasets of other types store frames percentile-normalised.
    normalize = "dtype" if first_image.dtype == np.uint8 else "percentile"
    protocol = resolve_protocol(config, validation_batches, test_batches)
    if protocol == "tiled" and config.distribution != "none":
        raise ValueError("eval_protocol tiled runs on one process without data parallelism; "
                         "use --eval-protocol resize with --distribution.")

    model, optimizer = build_for_training(config, in_channels, normalize)
    gates = GateSchedule(optimizer, gate_variables(model), config.gate_unfreeze_epoch)

    meta = dict(config=dataclasses.asdict(config), next_epoch=0, best_val_f1=-1.0, best_epoch=0, history=[])
    if saved is not None:
        meta = checkpoint.restore_run_state(directory, model, optimizer)
        meta["config"] = dataclasses.asdict(config)
        where = f"epoch {meta['next_epoch'] + 1}" + (f", batch {meta['next_batch'] + 1}" if meta.get("next_batch") else "")
        print(f"medt-train: resuming {directory} at {where}.", flush=True)
        if chief and meta["history"]:
            checkpoint.atomic_write_csv(os.path.join(directory, "log.csv"), meta["history"])
    meta = upgrade_meta(meta, train_batches.num_batches)
    if config.save_every_steps and config.steps_per_execution > 1:
        print(f"medt-train: --save-every-steps {config.save_every_steps} with --steps-per-execution "
              f"{config.steps_per_execution}: the state is saved at execution boundaries, at the first one "
              f"at or after every {config.save_every_steps} steps.", flush=True)
    gates.apply(meta["next_epoch"])
    return _Run(config, directory, write_dir, chief, process_count, device_count, started,
                (train_batches, validation_batches, test_batches), in_channels, protocol, model, optimizer, gates, meta,
                state_format)


def upgrade_meta(meta, steps_per_epoch):
    """The bookkeeping of a run state saved before saves inside epochs existed, in today's form.

    Such a state was saved at an epoch's end (``next_batch`` 0), after
    ``next_epoch`` epochs of ``steps_per_epoch`` steps. An Orbax run state
    of that time named its folders by epochs; new saves are named by steps,
    never fewer than the epochs, so the latest folder stays the latest.
    """
    return {"next_batch": 0, "step": meta["next_epoch"] * steps_per_epoch, **meta}


def _load_prepared_once(config, process_index, process_count):
    """The dataset's splits; in a multi-process run process 0 prepares them while the others wait.

    Preparing (TFDS ``download_and_prepare``) writes the dataset into
    ``data_dir``; the processes of a pod share it, and two writers would
    race. Process 0 loads (and so prepares if needed), then all meet at a
    barrier, then the others load what is there.
    """
    if process_count == 1:
        return load(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir)
    from jax.experimental import multihost_utils

    sources, failure = None, None
    if process_index == 0:
        try:
            sources = load(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir)
        except DatasetError as error:
            failure = error
    # The barrier: every process reaches it, also when process 0 failed, and learns whether it did.
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failure is not None)))
    if failure is not None:
        raise failure
    if failed:
        raise DatasetError(f"{config.dataset}: process 0 could not prepare the dataset (its error says why).")
    if sources is None:
        sources = load(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir)
    return sources


def _test_scores(run):
    """model -> test split scores, as the run's evaluation protocol computes them."""
    test_batches, config = run.batches[2], run.config
    if run.protocol == "tiled":
        return lambda model: whole_image_scores(model, test_batches, config.num_classes, config.tile_overlap)[0]
    return lambda model: model.evaluate(test_batches, verbose=0, return_dict=True)


def _fit(run, verbose, watch=None):
    """``model.fit`` over the remaining epochs with the run's callbacks; returns the seconds since start."""
    config, model, meta = run.config, run.model, run.meta
    train_batches, validation_batches, test_batches = run.batches
    test_scores = _test_scores(run) if config.test_each_epoch else None
    # An Orbax run state goes to the run's own folder from every process (each saves its shards).
    store = checkpoint.OrbaxRunState(run.directory) if run.state_format == "orbax" else None
    keeper = RunKeeper(run.write_dir, run.optimizer, config, meta, test_scores, state_store=store,
                       steps_per_epoch=train_batches.num_batches, watch=watch)
    callbacks = [EpochData(train_batches), run.gates, keeper]
    if config.nan_check_each_step:
        callbacks.append(StepNaNCheck(keeper))
    validation_data = validation_batches
    if run.protocol == "tiled":
        # Before the keeper, which reads val_f1 from the same logs.
        callbacks.insert(2, WholeImageValidation(validation_batches, config.num_classes, config.tile_overlap))
        validation_data = None

    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    print(
        f"medt-train: {config.model} on {config.dataset}: {train_batches.size} train / "
        f"{validation_batches.size} validation / {test_batches.size} test examples"
        + (f" ({train_batches.epoch_size} random {config.crop_size}x{config.crop_size} crops per epoch)"
           if train_batches.crops else "")
        + f", evaluation {run.protocol}, "
        f"{config.img_size}x{config.img_size}x{run.in_channels}, "
        f"{sum(int(np.prod(v.shape)) for v in model.trainable_variables):,} parameters, "
        f"epochs {meta['next_epoch'] + 1}..{config.epochs}"
        + (f" (from batch {meta['next_batch'] + 1})" if meta["next_batch"] else "") + f", output {run.directory}"
        + (f", data-parallel over {run.device_count} devices in {run.process_count} process(es)"
           if config.distribution != "none" else ""),
        flush=True,
    )
    try:
        if meta["next_epoch"] < config.epochs:
            # Keras may read a batch to build the model before the first epoch begins: that of the
            # first epoch run, so a resumed run's grain loader starts its stream there.
            train_batches.epoch = meta["next_epoch"]
            common = dict(validation_data=validation_data, callbacks=callbacks, shuffle=False, verbose=verbose)
            first = meta["next_epoch"]
            if meta["next_batch"]:
                # Resumed inside an epoch: its remaining batches first, then the epochs after it.
                model.fit(EpochTail(train_batches, meta["next_batch"]), epochs=first + 1, initial_epoch=first,
                          **common)
                first += 1
            if first < config.epochs and keeper.diverged is None:
                model.fit(train_batches, epochs=config.epochs, initial_epoch=first, **common)
    finally:
        if store is not None:
            store.close()  # waits until the last save is committed (also when preempted)
    if keeper.diverged is not None:
        epoch, batch, loss = keeper.diverged
        where = f"epoch {epoch + 1}" + (f", batch {batch + 1}" if batch is not None else
                                        " (--nan-check-each-step true names the batch)")
        saved = f"after epoch {meta['next_epoch']}" + (f", batch {meta['next_batch']}" if meta["next_batch"] else "")
        raise TrainingDiverged(
            f"loss became {loss} in {where}; training stopped. The last good state "
            f"({saved}) is in {run.directory}; lower --learning-rate and --resume."
        )
    return time.time() - run.started


def _finish(run, train_seconds):
    """The best epoch's weights tested, ``model.keras`` and ``test_metrics.json`` written; returns the report."""
    config, model, meta, directory, write_dir = run.config, run.model, run.meta, run.directory, run.write_dir
    test_batches = run.batches[2]
    # Each process reloads the copy it wrote itself (no race with process 0's
    # writes); a best epoch from before a resume exists only in the shared folder.
    best = os.path.join(write_dir, "best.weights.h5")
    if not files.exists(best):
        best = os.path.join(directory, "best.weights.h5")
    if files.exists(best):
        with files.local_copy(best) as local:
            model.load_weights(local)
    if run.protocol == "tiled":
        report = evaluate_test_tiled(model, test_batches, config, write_dir)
    else:
        report = evaluate_test(model, test_batches, config, write_dir, full=run.process_count == 1)
    report.update(
        eval_protocol=run.protocol,
        best_epoch=meta["best_epoch"],
        best_val_f1=meta["best_val_f1"],
        epochs=config.epochs,
        seconds_total=round(time.time() - run.started, 1),
        seconds_training=round(train_seconds, 1),
    )
    checkpoint.save_model(model, os.path.join(write_dir, "model.keras"))
    if not run.chief:
        shutil.rmtree(write_dir, ignore_errors=True)
        return report
    # NaN (an undefined score) is written as null: the file stays valid JSON.
    checkpoint.atomic_write_text(os.path.join(directory, "test_metrics.json"),
                                 json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    print(
        f"medt-train: test F1 {report['f1']:.4f}  IoU {report['iou']:.4f} ({run.protocol})  "
        f"(official protocol, per-image mean: F1 {report['official_f1']:.4f} IoU {report['official_iou']:.4f}) "
        f"with the best validation epoch {report['best_epoch']}; "
        f"{report['seconds_total']:.0f} s; files in {directory}",
        flush=True,
    )
    return report


def main(argv=None):
    parser = parser_with_overrides(prog="medt-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="gated_hela", help=f"one of: {', '.join(config_names())}, or a .py file")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output directory")
    parser.add_argument("--verbose", default="auto", help="Keras verbosity: auto, 0, 1 (progress bar) or 2")
    parser.add_argument("--list-configs", action="store_true")
    devices.add_argument(parser)
    hosts = parser.add_argument_group("multi-process (multi-host) runs, with --distribution data_parallel")
    hosts.add_argument("--coordinator-address", help="host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
    hosts.add_argument("--num-processes", type=int, help="(or JAX_NUM_PROCESSES)")
    hosts.add_argument("--process-id", type=int, help="(or JAX_PROCESS_ID)")
    hosts.add_argument("--cloud-tpu", action="store_true", help="Cloud TPU: process arguments from the environment")
    args = parser.parse_args(argv)
    if args.list_configs:
        for name in config_names():
            print(name)
        return 0
    devices.prepare_native_kernel("medt-train")
    try:
        config = apply_overrides(load_config(args.config), args)
        if config.output_dir is None:
            config = dataclasses.replace(config, output_dir=os.path.join("runs", os.path.basename(args.config).removesuffix(".py")))
        verbose = args.verbose if args.verbose == "auto" else int(args.verbose)
        multi_process = dict(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                             process_id=args.process_id, cloud_tpu=args.cloud_tpu)
        train(config, resume=args.resume, verbose=verbose, multi_process=multi_process,
              require_accelerator=args.require_accelerator)
    except preemption.Preempted as stop:
        print(f"medt-train: {stop}; exiting with status {preemption.PREEMPTED}: --resume continues at the "
              "next batch.", file=sys.stderr, flush=True)
        return preemption.PREEMPTED
    except (DatasetError, TrainingDiverged, devices.AcceleratorError, ValueError) as error:
        print(f"medt-train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
