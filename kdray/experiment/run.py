"""One experiment from config to saved student: the pipeline behind ``kdray train`` and each trial.

:func:`prepare` does the work shared by every run of a search (data, teacher), :func:`build`
(:mod:`kdray.experiment.teacher_signal`) checks the layers against the real models on one batch and sets
up the distiller, the probes and the teacher signal, and :func:`run` trains (:func:`train_student`),
tests (:func:`summarise`) and saves (:func:`save_run`). Nothing here knows about Ray or MLflow; they call in
through ``callbacks`` and ``start_state``.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml
from pydantic import ValidationError
from torch import nn

from kdray.config import ExperimentConfig, config_error_from
from kdray.core import compress as c
from kdray.core.bundle import DataBundle
from kdray.core.blocks import block_paths, resolve_pooling
from kdray.core.cache import CacheRequest, get_cache
from kdray.core.checkpoint import save_model
from kdray.core.compress import gzip_bytes, latency_ms
from kdray.core.hooks import list_layers
from kdray.core.methods import KD, ProbeKD
from kdray.core.probes import ProbeReport, ProbeSpec
from kdray.core.progress import epoch_bar
from kdray.core.signals import LiveTeacher, TeacherEnsemble
from kdray.core.train import (Data, EpochCallback, FitResult, accuracy, fit, predict, resolve_device, seed_everything,
                              test_metrics)
from kdray.data import make_bundle
from kdray.errors import ConfigError, KdrayError
from kdray.experiment.configs import parse_config
from kdray.experiment.preflight import check_data, check_devices, check_experiment, check_forward, check_teacher_sources
from kdray.experiment.teacher_signal import (Built, Prepared, build, cache_info, cache_request, pooled_dtype,
                                             uses_cache)
from kdray.experiment.teachers import ensemble_architecture, ensemble_mix, get_teachers
from kdray.models import build_model, count_parameters

__all__ = ["Built", "Prepared", "ProbeLayers", "RunSummary", "born_again", "build", "cache_info", "cache_request", "compress",
           "export_metrics", "list_model_layers", "prepare", "probe_layer_accuracies", "run", "save_run"]

log = logging.getLogger("kdray")


def prepare(cfg: ExperimentConfig) -> Prepared:
    """The data and the frozen teacher, with facts about the teacher: its classes, parameters and test accuracy
    (measured here unless the teacher cache will hold its test logits: a large teacher runs over the data once)."""
    bundle = make_bundle(cfg.data, cfg.cache_dir)
    teacher, info = None, {}
    if cfg.teacher is not None:
        teacher, info = get_teachers(cfg, bundle.num_classes, make_bundle=lambda d: make_bundle(d, cfg.cache_dir))
        teacher.eval().requires_grad_(False)
        x_test = bundle.teacher_x("test")
        info["teacher_classes"] = predict(teacher, x_test[:2], 2).shape[1]
        info["teacher_params"] = count_parameters(teacher)
        if info["teacher_classes"] == bundle.num_classes and not uses_cache(cfg, bundle):
            info["teacher_test_acc"] = accuracy(predict(teacher, x_test, cfg.data.eval_batch_size), bundle.y_test)
    return Prepared(bundle, teacher, info)


@dataclass
class RunSummary:
    name: str
    test_acc: float
    best_val_acc: float
    final_val_acc: float
    epochs: int
    stopped_early: bool
    student_params: int
    seconds: float
    teacher: dict[str, Any] = field(default_factory=dict)
    probes: list[dict] = field(default_factory=list)
    test_teacher_agreement: Optional[float] = None
    history: list[dict[str, float]] = field(default_factory=list)
    output_dir: Optional[str] = None
    export: dict[str, Any] = field(default_factory=dict)  # compressed variants: {"float"|"pruned"|"int8": metrics}
    data: dict[str, Any] = field(default_factory=dict)  # what the data set says of itself (e.g. dropped questions)

    def to_dict(self) -> dict:
        return asdict(self)


def run(cfg: ExperimentConfig, prep: Optional[Prepared] = None, *, callbacks: tuple[EpochCallback, ...] = (),
        start_state: Optional[dict] = None, output_dir: Optional[str | Path] = None, rank: int = 0,
        world_size: int = 1, wrap=None) -> RunSummary:
    """Train (or resume) the student of ``cfg``; test it; save it to ``output_dir`` when given.

    ``wrap(distiller) -> module`` lets a distributed caller wrap the distiller (e.g. in DDP).
    """
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    if prep is None:
        check_experiment(cfg)  # on the architectures, before a teacher is trained or loaded
        prep = prepare(cfg)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.seed)  # the same student init whether or not the teacher was trained just now
    built = build(cfg, prep, device)
    b = prep.bundle
    data = Data(b.x_train, b.y_train, b.x_val, b.y_val, cfg.data.batch_size, cfg.data.eval_batch_size, b.augment,
                b.x_test, b.y_test, built.teacher_test_pred)
    teacher_info = run_teacher_info(cfg, prep, built)
    export: dict[str, Any] = {}  # filled by the compression after the last epoch
    callbacks = (*run_callbacks(cfg, built, data, export, teacher_info, rank, world_size),
                 *with_probe_accuracy(callbacks, built.probes))
    result = train_student(cfg, built, data, callbacks, start_state, rank, world_size, wrap)
    summary = summarise(cfg, built, data, result, export, teacher_info, time.perf_counter() - t0)
    summary.data = {"name": b.name, **b.meta}
    if output_dir is not None and rank == 0:
        summary.output_dir = str(save_run(Path(output_dir), cfg, built.distiller.student, b, summary, built.int8))
    return summary


def run_teacher_info(cfg: ExperimentConfig, prep: Prepared, built: Built) -> dict[str, Any]:
    """What the summary says of the teacher: the prepared facts, and an ensemble's mix in this run."""
    teacher_info = dict(prep.teacher_info)
    if isinstance(prep.teacher, TeacherEnsemble):  # this run's mix of the members (a search may draw the weights)
        w, _ = ensemble_mix(cfg)
        teacher_info["ensemble_weights"] = [x / sum(w) for x in w]
    if built.teacher_test_pred is not None:  # this run's teacher (an ensemble: its mix) on the test split
        y_test = prep.bundle.y_test
        teacher_info["teacher_test_acc"] = (built.teacher_test_pred.cpu() == y_test).float().mean().item()
    return teacher_info


def with_probe_accuracy(callbacks: tuple[EpochCallback, ...], probes: list[ProbeReport]) -> tuple[EpochCallback, ...]:
    """The caller's callbacks, each seeing how well the probes behind the soft targets do the task."""
    if not probes:
        return callbacks
    probe_acc = {"probe_val_acc": sum(r.val_acc for r in probes) / len(probes)}
    return tuple((lambda cb: lambda m, state_fn: cb({**m, **probe_acc}, state_fn))(cb) for cb in callbacks)


def run_callbacks(cfg: ExperimentConfig, built: Built, data: Data, export: dict[str, Any], teacher_info: dict,
                  rank: int, world_size: int) -> tuple[EpochCallback, ...]:
    """The run's own callbacks, called before the caller's and adding to the epoch's metrics: the compression
    of the student after the last epoch (into ``export``) and the facts a multi-objective search may weigh."""
    last = cfg.train.epochs
    student = built.distiller.student
    n_params = float(count_parameters(student))

    def compress_last(metrics: dict, state_fn) -> None:
        # compressed before the last epoch is reported, so a search sees (and registers) the exported student
        if metrics["epoch"] == last and not export:
            export.update(compress(cfg, built, data))
            metrics.update(export_metrics(export))

    def student_facts(metrics: dict, state_fn) -> None:
        metrics["student_params"] = n_params
        if metrics["epoch"] == last and rank == 0:  # the student as shipped: int8, pruned or float
            shipped = export.get("int8") or export.get("pruned")  # already measured by compress_last
            metrics["student_gzip_bytes"] = float(shipped["gzip_bytes"] if shipped else gzip_bytes(student))
        if "teacher_test_acc" in teacher_info and metrics["epoch"] == last:
            metrics["teacher_test_acc"] = teacher_info["teacher_test_acc"]
        if cfg.export.measure_latency and metrics["epoch"] == last:
            metrics["latency_ms"] = latency_ms(student, data.x_test[:100])

    compressing = (cfg.export.sparsity > 0 or cfg.export.quantize) and world_size == 1
    return (compress_last, student_facts) if compressing else (student_facts,)


def train_student(cfg: ExperimentConfig, built: Built, data: Data, callbacks: tuple[EpochCallback, ...],
                  start_state: Optional[dict], rank: int, world_size: int, wrap=None) -> FitResult:
    """The epoch loop under a progress bar (rank 0); the distiller's and the live teacher's hooks are removed
    afterwards, whatever happens."""
    module = wrap(built.distiller) if wrap else built.distiller
    try:
        with epoch_bar(cfg.train.epochs, cfg.name, cfg.train.progress and rank == 0) as bar:
            return fit(built.distiller, data, cfg.train, seed=cfg.seed, teacher=built.signal,
                       online_teacher=built.online_teacher, teacher_val_pred=built.teacher_val_pred,
                       callbacks=callbacks, start_state=start_state, rank=rank, world_size=world_size,
                       module=module, progress=bar)
    finally:
        built.distiller.close()
        if isinstance(built.signal, LiveTeacher):
            built.signal.close()


def summarise(cfg: ExperimentConfig, built: Built, data: Data, result: FitResult, export: dict[str, Any],
              teacher_info: dict, seconds: float) -> RunSummary:
    """The run's summary; the test metrics of the last epoch (measured again if compression changed the student)."""
    student, hist = built.distiller.student, result.history
    final = hist[-1] if hist and "test_acc" in hist[-1] and not export else test_metrics(student, data)
    return RunSummary(
        name=cfg.name, test_acc=final["test_acc"],
        best_val_acc=max(h["val_acc"] for h in hist), final_val_acc=hist[-1]["val_acc"], epochs=len(hist),
        stopped_early=result.stopped_early, student_params=count_parameters(student), seconds=seconds,
        teacher=teacher_info, probes=[asdict(r) for r in built.probes],
        test_teacher_agreement=final.get("test_teacher_agreement"), history=hist, export=export)


def compress(cfg: ExperimentConfig, built: Built, data: Data) -> dict[str, Any]:
    """Prune (then fine-tune under the same distillation terms) and/or quantize the trained student, in
    place for pruning; returns accuracy, size and latency of each variant. ``built.int8`` gets the int8 copy."""

    student = built.distiller.student
    variants = {"float": copy.deepcopy(student).cpu().eval()}
    if cfg.export.sparsity > 0:
        c.prune_magnitude(student, cfg.export.sparsity)
        if cfg.export.finetune_epochs:
            tune_cfg = cfg.train.model_copy(update={"epochs": cfg.export.finetune_epochs})
            fit(built.distiller, Data(data.x_train, data.y_train, data.x_val, data.y_val, data.batch_size,
                                      data.eval_batch_size, data.augment),
                tune_cfg, seed=cfg.seed + 1, teacher=built.signal, teacher_val_pred=built.teacher_val_pred)
        c.make_pruning_permanent(student)
        variants["pruned"] = student
    if cfg.export.quantize:
        built.int8 = variants["int8"] = c.quantize_int8(student)
    out = {k: c.measure(m, data.x_test, data.y_test) for k, m in variants.items()}  # one after the other, warmed
    for k, v in out.items():
        log.info("%s student: test acc %.4f, %d bytes, %.3f ms per batch of 100 on the CPU, %.0f%% zero weights",
                 k, v["test_acc"], v["size_bytes"], v["latency_ms"], 100 * v["sparsity"])
    return out


def born_again(cfg: ExperimentConfig, generations: int, output_dir: str | Path, *,
               run_fn: Optional[Callable[[ExperimentConfig, Path, int], RunSummary]] = None) -> list[RunSummary]:
    """Born-again networks (Furlanello et al. 2018): generation 0 is ``cfg`` as it is; generation k > 0 trains
    a fresh student of the same architecture with logit KD from generation k-1's student as its teacher
    (``cfg``'s temperature and ce_weight; the kd term's weight if ``cfg`` has one). Each generation is saved
    under ``output_dir/gen<k>`` and summarised. ``run_fn(config, output_dir, generation)`` trains one
    generation (default :func:`run`; the MLflow layer passes one that logs it)."""

    run_fn = run_fn or (lambda c, out, g: run(c, output_dir=out))
    out = Path(output_dir)
    kd_weight = next((t.weight for t in cfg.distill.terms if t.method == KD.name and t.weight is not None), None)
    summaries = [run_fn(cfg, out / "gen0", 0)]
    log.info("born-again generation 0: test acc %.4f", summaries[0].test_acc)
    for g in range(1, generations + 1):
        raw = cfg.model_dump(mode="json")
        raw["name"] = f"{cfg.name}-gen{g}"
        raw["seed"] = cfg.seed + g
        raw["teacher"] = {"model": cfg.student.model_dump(mode="json"),
                          "checkpoint": str((out / f"gen{g - 1}" / "student.pt").resolve())}
        raw["extra_teachers"] = []
        raw["distill"] = {"temperature": cfg.distill.temperature, "ce_weight": cfg.distill.ce_weight,
                          "terms": [{"method": KD.name, **({"weight": kd_weight} if kd_weight is not None else {})}]}
        summaries.append(run_fn(parse_config(raw), out / f"gen{g}", g))
        log.info("born-again generation %d (teacher: generation %d, test acc %.4f): test acc %.4f", g, g - 1,
                 summaries[-2].test_acc, summaries[-1].test_acc)
    return summaries


def export_metrics(export: dict[str, Any]) -> dict[str, float]:
    """Flat metrics of the compressed variants (``int8_test_acc``, ``float_size_bytes`` ...); ``test_acc`` is
    the exported student's (pruned if pruned)."""
    out = {f"{variant}_{k}": float(v) for variant, m in export.items() for k, v in m.items()}
    if "pruned" in export:
        out["test_acc"] = export["pruned"]["test_acc"]
    return out


def save_run(out: Path, cfg: ExperimentConfig, student: nn.Module, bundle: DataBundle, summary: RunSummary,
             int8: Optional[nn.Module] = None) -> Path:
    """student.pt (weights-only kdray model file), config.yaml, metrics.csv and summary.json; with an int8
    variant also student_int8.pt (its state dict: rebuild the student, ``kdray.core.compress.quantize_int8`` it,
    then ``load_state_dict``). A trained student is never lost to a folder that turned bad during training
    (removed, made read-only, disk full): it is then saved to a new temporary folder, and the error says where."""
    try:
        return write_run(out, cfg, student, bundle, summary, int8)
    except OSError as e:
        import tempfile

        rescue = Path(tempfile.mkdtemp(prefix=f"kdray-{cfg.name}-"))
        write_run(rescue, cfg, student, bundle, summary, int8)
        raise KdrayError(f"could not save the run to {out} ({e.strerror or e}); the student and its files are "
                         f"saved in {rescue} instead") from None


def write_run(out: Path, cfg: ExperimentConfig, student: nn.Module, bundle: DataBundle, summary: RunSummary,
              int8: Optional[nn.Module] = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / "student.pt", student.cpu(), cfg.student, bundle.num_classes,
               {"test_acc": summary.test_acc, "experiment": cfg.name, "input_shape": list(bundle.x_train.shape[1:])})
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    import pandas as pd

    pd.DataFrame(summary.history).to_csv(out / "metrics.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2, default=str))
    if int8 is not None:
        torch.save(int8.state_dict(), out / "student_int8.pt")
    return out


def list_model_layers(cfg: ExperimentConfig, which: str = "both") -> list:
    """Every module of the teacher and/or student with its output shape on one batch of the data (each model on
    its own view of the examples).

    The models are built from their specs (no teacher training or checkpoint needed: shapes do not
    depend on weights).
    """

    b = check_data(cfg)
    n = min(len(b.x_train), cfg.data.batch_size)
    out = []
    if cfg.teacher is not None and which in ("teacher", "both"):
        teacher = ensemble_architecture(cfg, b.num_classes)
        t_example = b.teacher_x("train")[:n]
        check_forward(teacher, t_example, "teacher.model", data_name=b.name)
        out += list_layers(teacher, t_example, "teacher")
    if which in ("student", "both"):
        student = build_model(cfg.student, b.num_classes, "student")
        check_forward(student, b.x_train[:n], "student", b.num_classes, b.name)
        out += list_layers(student, b.x_train[:n], "student")
    return out


@dataclass
class ProbeLayers:
    """Where the answer lives: a probe's accuracy on every candidate teacher layer (in depth order) and the
    teacher's own accuracy (its answer tokens' for a language model) on the same validation examples."""

    pooling: str
    probes: list[dict]  # {layer, pooling, l2, dim, train_acc, val_acc, l2_chosen, ...} per layer, in depth order
    teacher_val_acc: Optional[float]
    teacher_test_acc: Optional[float]

    @property
    def val_acc(self) -> dict[str, float]:
        return {p["layer"]: p["val_acc"] for p in self.probes}

    @property
    def best(self) -> Optional[dict]:
        return max(self.probes, key=lambda p: p["val_acc"], default=None)


def probe_candidates(teacher: nn.Module, example: torch.Tensor, globs: Sequence[str] = ()) -> list[str]:
    """The teacher layers ``kdray layers --probes`` fits a probe on, in forward order: the model's blocks
    (:func:`kdray.core.blocks.block_paths`), or the module paths matching any of ``globs`` (``fnmatch`` patterns,
    e.g. ``model.bert.encoder.layer.*.output``); either way only modules that output one row per example."""
    infos = sorted((i for i in list_layers(teacher, example, "teacher") if i.order is not None), key=lambda i: i.order)
    ran = [i.path for i in infos if i.shape and i.shape[0] == len(example)]
    if not globs:
        wanted = set(block_paths(teacher))
        return [p for p in ran if p in wanted]
    chosen = [p for p in ran if any(fnmatch.fnmatchcase(p, g) for g in globs)]
    if not chosen:
        raise ConfigError("--layers", list(globs), "patterns matching teacher modules that output one row per "
                                                    f"example, e.g. {', '.join(ran[:4])} (`kdray layers CONFIG` "
                                                    "lists them)")
    return chosen


def probe_layer_accuracies(cfg: ExperimentConfig, pooling: str = "auto", globs: Sequence[str] = ()) -> ProbeLayers:
    """Validation accuracy of a Probe-KD probe (``pooling``, the default ``l2: auto`` and iterations: the strength
    cross-validated per layer on the labelled training examples, all layers at once) on every candidate teacher
    layer (:func:`probe_candidates`), from one teacher pass through the teacher cache (the teacher is trained if
    need be), and the teacher's own accuracy beside them."""

    if cfg.teacher is None:
        raise ConfigError("teacher", None, "a teacher (probes are fitted on its layers)")
    options = ProbeKD.Options
    try:
        opts = options(pooling=pooling)
    except ValidationError as e:
        raise ConfigError("--probes", pooling, config_error_from(e, root=options).allowed) from None
    check_devices(cfg)
    check_teacher_sources(cfg)
    list_model_layers(cfg, "teacher")  # data and teacher checked before the teacher is trained
    prep = prepare(cfg)
    b = prep.bundle
    example = b.teacher_x("train")[: min(len(b.x_train), 4)]  # enough for the shapes and the order
    paths = probe_candidates(prep.teacher, example, globs)
    specs = [ProbeSpec(p, resolve_pooling(prep.teacher, p, pooling), opts.l2, opts.max_iter) for p in paths]
    log.info("probes: fitting %d on the teacher's %s (%s pooling)", len(specs),
             f"layers matching {', '.join(globs)}" if globs else "blocks", describe_poolings(specs))
    t0 = time.perf_counter()
    req = CacheRequest((), tuple(specs), cfg.teacher_cache.dtype, pooled_dtype(cfg, prep.teacher))
    cache = get_cache(prep.teacher, b, req, cache_root=cfg.cache_dir, info=cache_info(cfg),
                      batch_size=cfg.data.eval_batch_size, device=resolve_device(cfg.train.device))
    records = [{**r, "depth": i} for i, r in enumerate(cache.probe_records(specs))]  # in forward order
    log.info("probes: %d fitted in %.1fs (teacher pass included, cache %s)", len(specs), time.perf_counter() - t0,
             "hit" if cache.hit else "built")
    acc = cache.manifest.get("teacher_accuracy", {})
    return ProbeLayers(describe_poolings(specs), records, acc.get("val"), acc.get("test"))


def describe_poolings(specs: Sequence[ProbeSpec]) -> str:
    return "/".join(dict.fromkeys(s.pooling for s in specs)) or "-"
