"""The training stack shared by every model in :mod:`scatlas.models`.

One loop, :func:`fit`, trains any :class:`Task` (a model's init and loss) on any batch stream that
is indexable by step (:class:`~scatlas.models.data.CellBatches` or anything with its
``iterate(start, prefetch=, put=, part=)`` method):

- a jitted train step: ``value_and_grad`` of the task's loss, optax AdamW with a cosine (or
  constant) schedule and linear warm-up, gradient clipping by global norm; the state is donated so
  parameters are updated in place;
- data parallelism with :mod:`jax.sharding`: a 1-D mesh over all devices (``"data"`` axis), batch
  arrays split along cells, state replicated; XLA inserts the gradient all-reduce, and batch-level
  statistics (BatchNorm, in-batch mining) stay global, so a sharded step computes what the
  single-device step computes. Multi-host jobs call :func:`initialize_distributed` first; every
  process then feeds its slice of each global batch (``part=``);
- deterministic seeds: parameters, dropout and batch ``t`` derive from ``TrainConfig.seed``;
- orbax checkpoints (atomic: orbax writes a temporary directory and renames it) of the train
  state and the loop's bookkeeping; a run started with the same ``checkpoint_dir`` resumes at the
  last checkpoint and reproduces the uninterrupted run;
- early stopping on a validation split; a progress bar with loss and cells/s; a JSON-lines log
  (:func:`read_log`) and a loss-curve plot (:func:`plot_history`).

Size (about 710 lines): the training loop, its checkpoints, its log and its plot are one
contract every model relies on (resume must reproduce the uninterrupted run).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .._host_memory import reused_freed_memory
from .._progress import bar
from .._validate import ScatlasInputError, TrainingDivergedError, check_positive_int

log = logging.getLogger(__name__)

Batch = dict[str, Any]


@dataclass
class TrainConfig:
    """Optimisation and loop settings (defaults follow SCimilarity where it has one).

    ``learning_rate`` 5e-3 and ``weight_decay`` 0.01 (AdamW), cosine decay to
    ``min_lr_ratio * learning_rate`` over ``max_steps`` after ``warmup_steps`` of linear warm-up;
    ``clip_norm`` (global gradient norm; None: off). The compute precision (float32 or bfloat16)
    belongs to the model's config (``MetricConfig.bf16``, ``MVAEConfig.bf16``). Every
    ``eval_every`` steps the validation loss is computed (when a validation set is given) and
    ``patience`` evaluations without improvement stop the run (None: never).
    ``checkpoint_dir``/``checkpoint_every``/``keep_checkpoints`` control orbax checkpoints,
    ``log_path``/``log_every`` the JSON-lines log. ``reuse_host_memory``: on the CPU, glibc
    keeps freed memory during the run instead of page-faulting each step's temporaries in
    again (:mod:`scatlas._host_memory`; the process holds its peak memory until the run ends).
    """

    max_steps: int = 1000
    learning_rate: float = 5e-3
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    clip_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 100
    patience: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_path: str | None = None
    log_every: int = 10
    progress: bool | None = None
    data_parallel: bool = True
    prefetch: int = 2
    reuse_host_memory: bool = True

    def __post_init__(self) -> None:
        check_positive_int(self.max_steps, "max_steps")
        check_positive_int(self.eval_every, "eval_every")
        check_positive_int(self.log_every, "log_every")
        check_positive_int(self.checkpoint_every, "checkpoint_every")
        if self.schedule not in ("cosine", "constant"):
            raise ScatlasInputError(
                f"schedule must be 'cosine' or 'constant', got {self.schedule!r}",
                param="schedule")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ScatlasInputError(f"learning_rate must be > 0, got {self.learning_rate!r}",
                                    param="learning_rate")
        if self.patience is not None:
            check_positive_int(self.patience, "patience")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate as a function of the step (warm-up, then cosine or constant)."""
    peak = cfg.learning_rate
    if cfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    else:
        decay = max(cfg.max_steps - cfg.warmup_steps, 1)
        main = optax.cosine_decay_schedule(peak, decay, alpha=cfg.min_lr_ratio)
    if cfg.warmup_steps <= 0:
        return main
    warm = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warm, main], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, as torch's AdamW) after optional global-norm clipping."""
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(make_schedule(cfg), weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


class Task(Protocol):
    """What a model gives the loop.

    ``init(rng, batch) -> variables``: flax variables (``{"params": ..., other collections}``).
    ``loss(params, state, batch, rng, step, train) -> (loss, (metrics, new_state))``: a scalar
    loss, a dict of scalar metrics and the updated non-parameter collections (BatchNorm
    statistics; return ``state`` unchanged when ``train`` is False). Must be jittable.
    Optional: ``optimizer(cfg) -> optax.GradientTransformation`` replaces
    :func:`make_optimizer` (e.g. one Adam per network of a GAN, ``optax.multi_transform``).
    """

    def init(self, rng: jax.Array, batch: Batch) -> dict[str, Any]: ...

    def loss(
        self, params: Any, state: Any, batch: Batch, rng: jax.Array, step: jax.Array, train: bool
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]: ...


class TrainState(struct.PyTreeNode):
    """Everything a step changes: step count, parameters, other collections, optimiser, rng."""

    step: jax.Array
    params: Any
    state: Any
    opt_state: Any
    rng: jax.Array


@dataclass
class FitResult:
    """``variables`` (the best on validation, else the last), the log ``history`` (dicts),
    ``best_step``, ``stopped_early``, ``steps`` done and timing (``cells_per_s`` excludes the first
    step's compilation)."""

    variables: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_val: float | None = None
    stopped_early: bool = False
    steps: int = 0
    cells_per_s: float | None = None
    compile_s: float | None = None


def initialize_distributed(**kwargs: Any) -> None:
    """Join a multi-host job (``jax.distributed.initialize(**kwargs)``; call before :func:`fit`).

    Coordinator address, process count and id come from ``kwargs`` or from the cluster
    environment (SLURM, Open MPI, Cloud TPU) as jax detects them. Each process then trains on
    ``batch_size / process_count`` cells of every global batch. CPU-only jobs (tests, CPU
    clusters) use gloo for the cross-process collectives.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def device_mesh(data_parallel: bool = True) -> Mesh:
    """A 1-D ``("data",)`` mesh over all devices (all processes), or the first one only."""
    devices = jax.devices() if data_parallel else jax.local_devices()[:1]
    return Mesh(np.asarray(devices), ("data",))


def _global_norm(tree: Any) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _device_batch(batch: Batch, sharding: NamedSharding) -> Batch:
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype == np.int64:
            value = value.astype(np.int32)
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def _batch_cells(batch: Batch) -> int:
    """Cells in a host batch: dense ``x``, CSR ``x_indptr`` (cells + 1) or its first entry."""
    if "x" in batch:
        return len(batch["x"])
    if "x_indptr" in batch:
        return len(batch["x_indptr"]) - 1
    return len(next(iter(batch.values())))


def _process_part(batch: Batch, part: tuple[int, int]) -> Batch:
    """Slice ``i`` of ``n`` equal slices (along cells) of a global host batch, for
    ``part=(i, n)`` (:func:`jax.make_array_from_process_local_data` takes each process's own
    rows); the whole batch when ``n == 1``."""
    i, n = part
    if n == 1:
        return batch
    if "x_indptr" in batch:
        raise ScatlasInputError("CSR batches (the sparse step) run on one device only")
    cells = _batch_cells(batch)
    if cells % n:
        raise ScatlasInputError(f"a batch of {cells} cells does not split over {n} processes")
    m = cells // n
    return {key: np.asarray(v)[i * m : (i + 1) * m] for key, v in batch.items()}


def _strip(batch: Batch) -> Batch:
    """Drop host-only entries (``index``) that the step does not use."""
    return {k: v for k, v in batch.items() if k != "index"}


class Trainer:
    """The compiled step functions of one task and config on one mesh (used by :func:`fit`)."""

    def __init__(self, task: Task, cfg: TrainConfig):
        self.task, self.cfg = task, cfg
        self.mesh = device_mesh(cfg.data_parallel)
        self.n_devices = self.mesh.devices.size
        # (this process's index, processes in the mesh): each feeds its slice of every batch
        n_proc = len({d.process_index for d in self.mesh.devices.flat})
        self.part = (jax.process_index(), n_proc) if n_proc > 1 else (0, 1)
        self.data = NamedSharding(self.mesh, P("data"))
        self.repl = NamedSharding(self.mesh, P())
        # a task may bring its own optimiser (a GAN's two networks: models.michigan)
        self.tx = getattr(task, "optimizer", make_optimizer)(cfg)
        self.train_step = jax.jit(
            self._train_step, in_shardings=(self.repl, self.data),
            out_shardings=(self.repl, self.repl), donate_argnums=(0,),
        )
        self.eval_step = jax.jit(
            self._eval_step, in_shardings=(self.repl, self.data), out_shardings=self.repl
        )

    def put(self, batch: Batch) -> Batch:
        """A host batch (this process's part) as global device arrays split over the mesh."""
        return _device_batch(_strip(batch), self.data)

    def init_state(self, batch: Batch) -> TrainState:
        rng = jax.random.PRNGKey(self.cfg.seed)
        init_rng, train_rng = jax.random.split(rng)
        host = {k: jnp.asarray(v) for k, v in _strip(batch).items()}
        variables = dict(self.task.init(init_rng, host))
        params = variables.pop("params")
        ts = TrainState(
            step=jnp.zeros((), jnp.int32), params=params, state=variables,
            opt_state=self.tx.init(params), rng=train_rng,
        )
        return jax.device_put(ts, self.repl)

    def _train_step(self, ts: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
        rng, sub = jax.random.split(ts.rng)
        grad_fn = jax.value_and_grad(self.task.loss, has_aux=True)
        (loss, (metrics, new_state)), grads = grad_fn(
            ts.params, ts.state, batch, sub, ts.step, True
        )
        updates, opt_state = self.tx.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        metrics = {"loss": loss, **metrics, "grad_norm": _global_norm(grads)}
        new_ts = ts.replace(
            step=ts.step + 1, params=params, state=new_state, opt_state=opt_state, rng=rng
        )
        return new_ts, metrics

    def _eval_step(self, ts: TrainState, batch: Batch) -> dict[str, Any]:
        loss, (metrics, _) = self.task.loss(
            ts.params, ts.state, batch, ts.rng, ts.step, False
        )
        return {"loss": loss, **metrics}

    def evaluate(self, ts: TrainState, batches: Sequence[Batch]) -> dict[str, float]:
        """Cell-weighted mean of the eval metrics over ``batches`` (host batches)."""
        sums: dict[str, float] = {}
        total = 0
        for b in batches:
            n = _batch_cells(b)
            if n % self.n_devices:
                raise ScatlasInputError(
                    f"validation batch of {n} cells does not split over {self.n_devices} devices"
                )
            m = jax.device_get(self.eval_step(ts, self.put(_process_part(b, self.part))))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            total += n
        return {k: v / total for k, v in sums.items()}


# ---------------------------------------------------------------------------------- checkpoints

class _Checkpoints:
    """orbax CheckpointManager over ``{"state": TrainState, "loop": json}``."""

    def __init__(self, directory: str | Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, ts: TrainState, loop: dict[str, Any], best: Any = None) -> None:
        """The train state, the loop's JSON bookkeeping and (when there is one) the best
        variables on validation, so that a resumed run returns what the uninterrupted one
        would."""
        args = self.ocp.args
        items = {"state": args.StandardSave(ts), "loop": args.JsonSave(loop)}
        if best is not None:
            items["best"] = args.StandardSave(best)
        self.manager.save(step, args=args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore_loop(self, step: int) -> dict[str, Any]:
        """Only the loop's bookkeeping (cheap; read before the state to check the settings)."""
        args = self.ocp.args
        out = self.manager.restore(step, args=args.Composite(loop=args.JsonRestore()))
        return dict(out["loop"])

    def restore(self, step: int, like: TrainState, best_like: Any = None) -> tuple[TrainState, Any]:
        """The train state and, if ``best_like`` is given, the best variables (host arrays)."""
        args = self.ocp.args
        items = {"state": args.StandardRestore(_abstract(like))}
        if best_like is not None:
            items["best"] = args.StandardRestore(_abstract(best_like))
        out = self.manager.restore(step, args=args.Composite(**items))
        best = jax.device_get(out["best"]) if best_like is not None else None
        return out["state"], best

    def close(self) -> None:
        self.manager.close()


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )


# Settings that change a run's trajectory: a resumed run must have the checkpointed values.
_TRAJECTORY = ("max_steps", "learning_rate", "weight_decay", "schedule", "warmup_steps",
               "min_lr_ratio", "clip_norm", "seed")


def run_settings(task: Task, cfg: TrainConfig, trainer: Trainer, batches: Any, ts: TrainState,
                 val_batches: Sequence[Batch] | None) -> dict[str, str]:
    """What a checkpoint records of its run, and a resumed run must match (canonical strings):
    the trajectory settings of ``cfg``, the devices used, the batch stream's ``settings()``
    (when it has them), the task's config fields that differ from their defaults (a field
    added to a config later leaves older checkpoints resumable), the task's label relation
    (a digest), one entry per parameter shape, and with a validation split its cadence and its
    cells (a digest of the batches' ``index`` rows, or their sizes)."""
    import dataclasses

    from .data import digest

    out = {k: _canonical(getattr(cfg, k)) for k in _TRAJECTORY}
    out["devices"] = _canonical(trainer.n_devices)
    if hasattr(batches, "settings"):
        out.update({f"data.{k}": _canonical(v) for k, v in batches.settings().items()})
    config = getattr(task, "config", None)
    if dataclasses.is_dataclass(config):
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        out.update({f"model.{k}": _canonical(v) for k, v in vars(config).items()
                    if k in defaults and _canonical(v) != _canonical(defaults[k])})
    related = getattr(task, "related", None)
    if related is not None:
        out["model.related"] = digest(np.asarray(related, bool))
    for path, leaf in jax.tree_util.tree_leaves_with_path(ts.params):
        out[f"params{jax.tree_util.keystr(path)}"] = _canonical(tuple(leaf.shape))
    if val_batches:
        out.update(eval_every=_canonical(cfg.eval_every), patience=_canonical(cfg.patience))
        out["validation.cells"] = digest(
            *(np.asarray(b.get("index", _batch_cells(b)), np.int64) for b in val_batches))
    return out


def _canonical(value: Any) -> str:
    """A stable string of a setting: numpy scalars as Python ones, lists as tuples."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, list | tuple):
        return "(" + ", ".join(_canonical(v) for v in value) + ")"
    if isinstance(value, float):
        return repr(float(value))
    return repr(value)


def _check_resume(saved: dict[str, str] | None, now: dict[str, str], directory: str) -> None:
    if saved is None:  # checkpoints of an older scatlas: nothing recorded
        return
    diff = [f"{k}: {saved.get(k, 'default')} -> {now.get(k, 'default')}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise ScatlasInputError(
            f"checkpoint_dir {directory!r} holds a run with other settings ({shown}); resuming "
            "would not reproduce either run: use the same settings or a new checkpoint_dir"
        )


def _check_finite(rec: dict[str, Any], key: str, step: int) -> None:
    if not math.isfinite(rec[key]):
        raise TrainingDivergedError(
            f"the {'validation' if key.startswith('val') else 'training'} loss is {rec[key]} at "
            f"step {step}: check the input for NaN or infinite values, or lower learning_rate "
            "(no checkpoint or model is written from this step on)"
        )


# ------------------------------------------------------------------------------------- the loop

def fit(
    task: Task,
    batches: Any,
    cfg: TrainConfig,
    *,
    val_batches: Sequence[Batch] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train ``task`` on ``batches`` (an indexable stream, see the module docstring).

    ``val_batches``: host batches of a validation split; with ``cfg.patience`` they drive early
    stopping and the best parameters are returned. With ``cfg.checkpoint_dir`` the run saves
    every ``checkpoint_every`` steps (and at the end) and, if checkpoints exist there already,
    resumes from the latest one. Returns a :class:`FitResult`.
    """
    trainer = Trainer(task, cfg)
    batch_size = int(getattr(batches, "batch_size", 0)) or None
    if batch_size is not None and batch_size % trainer.n_devices:
        raise ScatlasInputError(
            f"batch_size={batch_size} must be a multiple of the {trainer.n_devices} devices used "
            "for data parallelism (or set data_parallel=False)"
        )
    ts = trainer.init_state(batches.batch(0))
    settings = run_settings(task, cfg, trainer, batches, ts, val_batches)
    loop: dict[str, Any] = {"best_val": None, "best_step": None, "bad_evals": 0, "history": [],
                            "stopped": False, "settings": settings}
    ckpt = _Checkpoints(cfg.checkpoint_dir, cfg.keep_checkpoints) if cfg.checkpoint_dir else None
    best_vars = None
    start = 0
    if ckpt is not None and ckpt.latest() is not None:
        start = int(ckpt.latest())
        saved = ckpt.restore_loop(start)
        _check_resume(saved.get("settings"), settings, cfg.checkpoint_dir)
        ts, best_vars = ckpt.restore(start, ts, _variables(ts) if saved.get("has_best") else None)
        loop.update(saved, settings=settings)
        if loop["best_step"] is not None and best_vars is None:  # an older scatlas's checkpoint
            log.warning("the checkpoint holds no best weights: early stopping starts afresh")
            loop.update(best_val=None, best_step=None, bad_evals=0)
        log.info("resuming from checkpoint step %d in %s", start, cfg.checkpoint_dir)
    history: list[dict[str, Any]] = list(loop.get("history", []))
    logger = _JsonLog(cfg.log_path, history)
    result = FitResult(variables={}, history=history)
    stream = batches.iterate(start, prefetch=cfg.prefetch, put=trainer.put,
                             **_part_kw(trainer.part))
    acc: dict[str, Any] | None = None
    n_acc = 0
    t_first = t_timed = None
    timed_steps = 0
    stopped = bool(loop.get("stopped"))  # a finished, early-stopped run is not trained further
    keep_memory = cfg.reuse_host_memory and jax.default_backend() == "cpu"
    try:
        with (reused_freed_memory(keep_memory),
              bar(desc="training", total=cfg.max_steps, progress=cfg.progress, unit="step") as pb):
            pb.update(start)
            for step in range(start, start if stopped else cfg.max_steps):
                t0 = time.perf_counter()
                ts, metrics = trainer.train_step(ts, next(stream))
                acc = metrics if acc is None else jax.tree_util.tree_map(jnp.add, acc, metrics)
                n_acc += 1
                done = step + 1
                if t_first is None:
                    jax.block_until_ready(ts.step)
                    t_first = time.perf_counter() - t0
                    t_timed = time.perf_counter()
                else:
                    timed_steps += 1
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    rec = {k: float(v) / n_acc for k, v in jax.device_get(acc).items()}
                    acc, n_acc = None, 0
                    rate = _rate(batch_size, timed_steps, t_timed)
                    rec = {"step": done, "lr": float(make_schedule(cfg)(done - 1)), **rec}
                    if rate is not None:
                        rec["cells_per_s"] = rate
                    _check_finite(rec, "loss", done)
                    _emit(rec, history, logger, on_log)
                    pb.set_postfix(loss=f"{rec['loss']:.4g}", cells_s=f"{rate or 0:.3g}")
                pb.update(1)
                if val_batches and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                    val = trainer.evaluate(ts, val_batches)
                    rec = {"step": done, **{f"val_{k}": v for k, v in val.items()}}
                    _check_finite(rec, "val_loss", done)
                    _emit(rec, history, logger, on_log)
                    if loop["best_val"] is None or val["loss"] < loop["best_val"]:
                        loop.update(best_val=val["loss"], best_step=done, bad_evals=0)
                        best_vars = jax.device_get(_variables(ts))
                    else:
                        loop["bad_evals"] += 1
                        if cfg.patience is not None and loop["bad_evals"] >= cfg.patience:
                            stopped = True
                if ckpt is not None and (done % cfg.checkpoint_every == 0 or stopped
                                         or done == cfg.max_steps):
                    if acc is not None:  # steps not logged yet: never checkpoint NaN weights
                        _check_finite({"loss": float(acc["loss"]) / n_acc}, "loss", done)
                    loop.update(history=history, stopped=stopped, has_best=best_vars is not None)
                    ckpt.save(done, ts, loop, best_vars)
                if stopped:
                    log.info("early stop at step %d (best step %s)", done, loop["best_step"])
                    break
    finally:
        if hasattr(stream, "close"):
            stream.close()
        logger.close()
        if ckpt is not None:
            ckpt.close()
    final = jax.device_get(_variables(ts))
    result.variables = best_vars if best_vars is not None else final
    result.best_step, result.best_val = loop["best_step"], loop["best_val"]
    result.stopped_early = stopped
    result.steps = int(jax.device_get(ts.step))
    result.cells_per_s = _rate(batch_size, timed_steps, t_timed)
    result.compile_s = t_first
    return result


def _variables(ts: TrainState) -> dict[str, Any]:
    """The flax variables of a train state (``params`` and the other collections)."""
    return {"params": ts.params, **ts.state}


def _part_kw(part: tuple[int, int]) -> dict[str, Any]:
    return {} if part[1] == 1 else {"part": part}


def _rate(batch_size: int | None, steps: int, t0: float | None) -> float | None:
    if batch_size is None or t0 is None or steps == 0:
        return None
    return batch_size * steps / max(time.perf_counter() - t0, 1e-9)


def _emit(rec: dict[str, Any], history: list, logger: _JsonLog, on_log: Callable | None) -> None:
    history.append(rec)
    logger.write(rec)
    if on_log is not None:
        on_log(rec)


class _JsonLog:
    """JSON-lines log (one record per line, flushed), started with ``history``: a resumed run
    rewrites the records up to its checkpoint, so records past it are not repeated."""

    def __init__(self, path: str | None, history: Sequence[dict[str, Any]] = ()):
        self._fh = None
        if path is not None and jax.process_index() == 0:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "w")  # noqa: SIM115 - closed in close()
            for rec in history:
                self.write(rec)

    def write(self, rec: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines training log."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


#: log keys that are not loss terms: bookkeeping and diagnostics (and counts, ``n_*``)
NOT_TERMS = ("step", "lr", "loss", "cells_per_s", "grad_norm", "kl_weight")


@dataclass
class Panel:
    """One panel of :func:`plot_history`: the log key, its title, the training and validation
    series (``[(step, value)]``; validation empty when not logged or always 0) and the y scale
    (``"log"`` where every value is positive and they span at least a factor of 10)."""

    key: str
    title: str
    train: list[tuple[int, float]]
    val: list[tuple[int, float]]
    yscale: str


def _yscale(values: Sequence[float]) -> str:
    positive = [v for v in values if math.isfinite(v)]
    if positive and all(v > 0 for v in positive) and max(positive) >= 10 * min(positive):
        return "log"
    return "linear"


def history_panels(
    history: Sequence[dict[str, Any]], terms: dict[str, float | None] | None = None
) -> list[Panel]:
    """The panels :func:`plot_history` draws: the total loss, then every loss term on its own.

    ``terms``: ``{log key: weight in the loss or None}`` (a model's ``loss_terms``, e.g. the
    metric encoder's ``{"triplet": 0.001, "mse": 0.999, "l1": 1.0}``); terms of weight 0 and
    keys missing from the log are left out. None: every numeric key of the training records
    except :data:`NOT_TERMS` and counts (``n_*``), in log order, weights unknown. A term whose
    training values are all 0 is left out; titles carry the weight when it is not 1.
    """
    train_recs = [r for r in history if "loss" in r]
    val_recs = [r for r in history if "val_loss" in r]
    if terms is None:
        keys: dict[str, float | None] = {}
        for r in train_recs:
            for k, v in r.items():
                if (k not in NOT_TERMS and not k.startswith("n_") and isinstance(v, int | float)
                        and not isinstance(v, bool)):
                    keys.setdefault(k, None)
        terms = keys
    panels = []
    for key, weight in [("loss", None), *terms.items()]:
        if weight == 0:
            continue
        train = [(int(r["step"]), float(r[key])) for r in train_recs if key in r]
        val = [(int(r["step"]), float(r[f"val_{key}"])) for r in val_recs if f"val_{key}" in r]
        if not train and not val:
            continue
        if key != "loss" and all(v == 0 for _, v in train):
            continue
        if all(v == 0 for _, v in val):
            val = []
        title = "total loss" if key == "loss" else key
        if weight is not None and weight != 1:
            title += f" (weight {weight:g})"
        panels.append(Panel(key, title, train, val,
                            _yscale([v for _, v in train] + [v for _, v in val])))
    return panels


def plot_history(
    history: Sequence[dict[str, Any]] | str | Path,
    path: str | Path,
    *,
    terms: dict[str, float | None] | None = None,
) -> Path:
    """Loss curves as a PNG: the total loss and each loss term on its own panel
    (:func:`history_panels`), training per logged step, validation (dots) where logged; a log
    y axis where the values span a factor of 10 or more. ``history``: the records or a
    JSON-lines log (:func:`read_log`); ``terms``: the model's ``loss_terms`` (weights in the
    titles). Written atomically; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write

    if isinstance(history, str | Path):
        history = read_log(history)
    panels = history_panels(history, terms) or [Panel("loss", "total loss", [], [], "linear")]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        if panel.train:
            ax.plot(*zip(*panel.train, strict=True), label="train")
        if panel.val:
            ax.plot(*zip(*panel.val, strict=True), "o-", markersize=3, label="validation")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.key)
        ax.set_yscale(panel.yscale)
        ax.grid(True, which="major", alpha=0.3)
        if panel.val:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
