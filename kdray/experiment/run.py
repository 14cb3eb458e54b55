"""One experiment from config to saved student: the pipeline behind ``kdray train`` and each trial.

:func:`prepare` does the work shared by every run of a search (data, teacher), :func:`build` checks
the layers against the real models on one batch and sets up the distiller, the probes and the teacher
signal, and :func:`run` trains, tests and saves. Nothing here knows about Ray or MLflow; they call in
through ``callbacks`` and ``start_state``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import yaml
from pydantic import ValidationError
from torch import nn

from kdray.config import ExperimentConfig, config_error_from
from kdray.core import compress as c
from kdray.core.bundle import DataBundle
from kdray.core.cache import CacheRequest, TeacherCache, get_cache
from kdray.core.checkpoint import save_model
from kdray.core.compress import gzip_bytes, latency_ms
from kdray.core.hooks import list_layers, output_shapes
from kdray.core.methods import KD, TEACHER_LAYERS, ProbeKD, build_terms
from kdray.core.probes import ProbeReport, ProbeSpec
from kdray.core.progress import epoch_bar
from kdray.core.signals import (LiveTeacher, PrecomputedTeacher, TeacherEnsemble, fit_probes, mix_logits, probe_specs,
                                teacher_pass)
from kdray.core.train import (Data, Distiller, EpochCallback, accuracy, fit, predict, resolve_device, seed_everything,
                              test_metrics)
from kdray.data import make_bundle
from kdray.errors import ConfigError, KdrayError
from kdray.experiment.configs import parse_config
from kdray.experiment.preflight import build_distiller, check_data, check_devices, check_experiment, check_forward
from kdray.experiment.teachers import ensemble_architecture, ensemble_mix, get_teachers, teacher_for
from kdray.models import build_model, count_parameters

log = logging.getLogger("kdray")


@dataclass
class Prepared:
    """Shared by all runs on the same data and teacher: built once per search."""
    bundle: DataBundle
    teacher: Optional[nn.Module]
    teacher_info: dict[str, Any]
    cache: Optional[TeacherCache] = None  # teacher outputs for every example (a search fills it up-front)


def prepare(cfg: ExperimentConfig) -> Prepared:
    bundle = make_bundle(cfg.data, cfg.cache_dir)
    teacher, info = None, {}
    if cfg.teacher is not None:
        teacher, info = get_teachers(cfg, bundle.num_classes, make_bundle=lambda d: make_bundle(d, cfg.cache_dir))
        teacher.eval().requires_grad_(False)
        t_logits = predict(teacher, bundle.x_test, cfg.data.eval_batch_size)
        if t_logits.shape[1] == bundle.num_classes:
            info["teacher_test_acc"] = accuracy(t_logits, bundle.y_test)
        info["teacher_classes"] = t_logits.shape[1]
        info["teacher_params"] = count_parameters(teacher)
    return Prepared(bundle, teacher, info)


@dataclass
class Built:
    distiller: Distiller
    signal: Any  # a TeacherSignal, or None without a teacher
    online_teacher: Optional[nn.Module]
    probes: list[ProbeReport]
    teacher_val_pred: Optional[torch.Tensor]
    teacher_test_pred: Optional[torch.Tensor]
    int8: Optional[nn.Module] = None  # the dynamically quantized student, when cfg.export.quantize


def build(cfg: ExperimentConfig, prep: Prepared, device: torch.device) -> Built:
    """Check layers and shapes, build adapters, fit probes, choose the teacher signal."""
    b = prep.bundle
    example = b.x_train[: min(len(b.x_train), cfg.data.batch_size)].to(device)
    teacher = teacher_for(prep.teacher.to(device), cfg) if prep.teacher is not None else None
    distiller = build_distiller(cfg, teacher, b.num_classes, example, b.name)
    if teacher is None:
        return Built(distiller, None, None, [], None, None)
    eval_bs = cfg.data.eval_batch_size
    same_classes = prep.teacher_info.get("teacher_classes") == b.num_classes
    specs = probe_specs(distiller.terms)
    if cfg.distill.scheme == "offline" and b.augment is None and cfg.teacher_cache.enabled and \
            (req := cache_request([cfg], prep, example)) is not None:
        cache = usable_cache(cfg, prep, req, device)
        signal, reports = cached_signal(cache, distiller, specs, teacher)
        val_pred, test_pred = [cached_logits(cache, s, teacher).argmax(1)
                               if same_classes and len(cache.arrays[s]["label"]) else None for s in ("val", "test")]
        return Built(distiller, signal, None, reports, val_pred, test_pred)
    teacher_val_pred = (predict(teacher, b.x_val.to(device), eval_bs).argmax(1).cpu()
                        if same_classes and len(b.x_val) else None)
    teacher_test_pred = predict(teacher, b.x_test.to(device), eval_bs).argmax(1).cpu() if same_classes else None
    if cfg.distill.scheme == "online":
        teacher = copy.deepcopy(teacher).train().requires_grad_(True)  # the shared one stays frozen
        return Built(distiller, LiveTeacher(teacher, distiller.teacher_layers, {}), teacher, [], teacher_val_pred,
                     teacher_test_pred)
    if b.augment is not None:
        log.info("teacher signal: live (inputs are augmented, so cached teacher outputs would not match)")
    probe_layers = [s.layer for s in specs]
    # augmented inputs: the teacher runs live, so only the probes' layers are needed up-front
    layers = sorted(set(probe_layers) if b.augment is not None else set(distiller.teacher_layers) | set(probe_layers))
    t0 = time.perf_counter()
    logits, feats = teacher_pass(teacher, b.x_train.to(device), layers, eval_bs)
    _, val_feats = teacher_pass(teacher, b.x_val.to(device), probe_layers, eval_bs)
    probes, reports = fit_probes(specs, feats, b.y_train.to(device), val_feats, b.y_val.to(device), b.num_classes)
    if b.augment is not None:
        signal: Any = LiveTeacher(teacher, distiller.teacher_layers, probes)
    else:
        probe_logits = {p: probe(feats[p]) for p, probe in probes.items()}
        signal = PrecomputedTeacher(logits, {p: feats[p] for p in feature_layers(distiller.terms)}, probe_logits)
        log.info("teacher signal: computed once in memory for %d examples in %.2fs (not cached)", len(b.x_train),
                 time.perf_counter() - t0)
    return Built(distiller, signal, None, reports, teacher_val_pred, teacher_test_pred)


# --------------------------------------------------------------------------------------------------
# the teacher cache (kdray.core.cache) as the teacher signal


def feature_layers(terms: Iterable[Any]) -> list[str]:
    """Teacher layers whose full outputs a term reads (a term reading probes only needs its probe's output)."""
    return sorted({p for m in terms if TEACHER_LAYERS in m.reads for p in m.teacher_layers})


def cache_request(cfgs: list[ExperimentConfig], prep: Prepared, example: torch.Tensor) -> Optional[CacheRequest]:
    """What the offline runs of ``cfgs`` (one run, or every corner of a search space) need from the teacher,
    in float16 when float32 would exceed the feature budget; None when even float16 would (then each run
    computes the teacher's outputs in memory, uncached)."""

    members = tuple(prep.teacher.member_paths) if isinstance(prep.teacher, TeacherEnsemble) else ()
    req = CacheRequest(members, dtype=cfgs[0].teacher_cache.dtype)  # an ensemble: every member's logits
    for cfg in cfgs:
        if cfg.distill.scheme == "offline":
            terms = [m for _, _, m in build_terms(cfg.distill.terms, cfg.distill.temperature)]
            req = req.union(CacheRequest(tuple(feature_layers(terms)), tuple(probe_specs(terms)), req.dtype))
    return fit_budget(req, cfgs[0], prep, example)


def fit_budget(req: CacheRequest, cfg: ExperimentConfig, prep: Prepared, example: torch.Tensor
               ) -> Optional[CacheRequest]:
    if not req.feature_layers or prep.teacher is None:
        return req
    b = prep.bundle
    n = len(b.x_train) + len(b.x_val) + len(b.x_test)
    shapes = output_shapes(prep.teacher, example[:2].to(next(prep.teacher.parameters()).device),
                           list(req.feature_layers), "teacher_layers")
    per_example = sum(math.prod(s[1:]) for s in shapes.values())
    budget = cfg.teacher_cache.max_feature_mb * 1e6
    size = lambda dtype: n * per_example * (2 if dtype == "float16" else 4)  # noqa: E731
    if size(req.dtype) <= budget:
        return req
    if size("float16") <= budget:
        log.info("teacher cache: full outputs of %s take %.0f MB in %s, over teacher_cache.max_feature_mb=%g: "
                 "storing them in float16", ", ".join(req.feature_layers), size(req.dtype) / 1e6, req.dtype,
                 cfg.teacher_cache.max_feature_mb)
        return CacheRequest(req.feature_layers, req.probes, "float16")
    log.info("teacher cache: full outputs of %s take %.0f MB even in float16, over teacher_cache.max_feature_mb=%g:"
             " not cached", ", ".join(req.feature_layers), size("float16") / 1e6, cfg.teacher_cache.max_feature_mb)
    return None


def usable_cache(cfg: ExperimentConfig, prep: Prepared, req: CacheRequest, device: torch.device) -> TeacherCache:
    if prep.cache is not None and prep.cache.covers(req):
        return prep.cache
    return get_cache(prep.teacher, prep.bundle, req, cache_root=cfg.cache_dir, info=cache_info(cfg),
                     batch_size=cfg.data.eval_batch_size, device=device)


def cache_info(cfg: ExperimentConfig) -> dict:
    return {"teacher": {"model": cfg.teacher.model.name if cfg.teacher else ""},
            "data": {"config": cfg.data.model_dump(mode="json")}}


def cached_logits(cache: TeacherCache, split: str, teacher: Optional[nn.Module]) -> torch.Tensor:
    """The teacher's logits for ``split`` from the cache; an ensemble's mixed from its members' cached logits
    with the weights and temperature of this run."""
    if isinstance(teacher, TeacherEnsemble):
        return mix_logits([cache.tensor(split, f"feat/{p}") for p in teacher.member_paths], teacher.weights,
                          teacher.temperature)
    return cache.tensor(split, "logits")


def cached_signal(cache: TeacherCache, distiller: Distiller, specs: list, teacher: Optional[nn.Module] = None
                  ) -> tuple[PrecomputedTeacher, list]:
    probe_logits, reports = {}, []
    for spec in specs:
        logits, report = cache.probe(spec)
        probe_logits[spec.layer] = logits
        reports.append(report)
    signal = PrecomputedTeacher(cached_logits(cache, "train", teacher),
                                {p: cache.tensor("train", f"feat/{p}") for p in feature_layers(distiller.terms)},
                                probe_logits)
    log.info("teacher signal: from the teacher cache (entry %s, %s)", cache.key, "hit" if cache.hit else "built now")
    return signal, reports


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
    module = wrap(built.distiller) if wrap else built.distiller
    if built.probes:  # every epoch's report says how well the probes behind the soft targets do the task
        probe_acc = {"probe_val_acc": sum(r.val_acc for r in built.probes) / len(built.probes)}
        callbacks = tuple((lambda cb: lambda m, state_fn: cb({**m, **probe_acc}, state_fn))(cb) for cb in callbacks)
    show = cfg.train.progress and rank == 0
    export: dict[str, Any] = {}
    first: list[EpochCallback] = []  # run before the caller's callbacks, adding to the epoch's metrics

    def compress_last(metrics: dict, state_fn) -> None:
        # compressed before the last epoch is reported, so a search sees (and registers) the exported student
        if metrics["epoch"] == cfg.train.epochs and not export:
            export.update(compress(cfg, built, data))
            metrics.update(export_metrics(export))

    if (cfg.export.sparsity > 0 or cfg.export.quantize) and world_size == 1:
        first.append(compress_last)
    n_params = float(count_parameters(built.distiller.student))
    teacher_info = dict(prep.teacher_info)
    if isinstance(prep.teacher, TeacherEnsemble):  # this run's mix of the members (a search may draw the weights)
        w, _ = ensemble_mix(cfg)
        teacher_info["ensemble_weights"] = [x / sum(w) for x in w]
        if built.teacher_test_pred is not None:
            teacher_info["teacher_test_acc"] = (built.teacher_test_pred.cpu() == b.y_test).float().mean().item()

    def student_facts(metrics: dict, state_fn) -> None:  # what a multi-objective search may weigh
        metrics["student_params"] = n_params
        if metrics["epoch"] == cfg.train.epochs and rank == 0:  # the student as shipped: int8, pruned or float

            shipped = export.get("int8") or export.get("pruned")  # already measured by compress_last
            metrics["student_gzip_bytes"] = float(shipped["gzip_bytes"] if shipped else
                                                  gzip_bytes(built.distiller.student))
        if "teacher_test_acc" in teacher_info and metrics["epoch"] == cfg.train.epochs:
            metrics["teacher_test_acc"] = teacher_info["teacher_test_acc"]
        if cfg.export.measure_latency and metrics["epoch"] == cfg.train.epochs:

            metrics["latency_ms"] = latency_ms(built.distiller.student, b.x_test[:100])

    callbacks = (*first, student_facts, *callbacks)
    try:
        with epoch_bar(cfg.train.epochs, cfg.name, show) as bar:
            result = fit(built.distiller, data, cfg.train, seed=cfg.seed, teacher=built.signal,
                         online_teacher=built.online_teacher, teacher_val_pred=built.teacher_val_pred,
                         callbacks=callbacks, start_state=start_state, rank=rank, world_size=world_size,
                         module=module, progress=bar)
    finally:
        built.distiller.close()
        if isinstance(built.signal, LiveTeacher):
            built.signal.close()
    student = built.distiller.student
    final = (result.history[-1] if result.history and "test_acc" in result.history[-1] and not export
             else test_metrics(student, data))
    hist = result.history
    summary = RunSummary(
        name=cfg.name, test_acc=final["test_acc"],
        best_val_acc=max(h["val_acc"] for h in hist), final_val_acc=hist[-1]["val_acc"], epochs=len(hist),
        stopped_early=result.stopped_early, student_params=count_parameters(student),
        seconds=time.perf_counter() - t0, teacher=teacher_info,
        probes=[asdict(r) for r in built.probes], test_teacher_agreement=final.get("test_teacher_agreement"), history=hist,
        export=export)
    if output_dir is not None and rank == 0:
        summary.output_dir = str(save_run(Path(output_dir), cfg, student, b, summary, built.int8))
    return summary


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
    """Every module of the teacher and/or student with its output shape on one batch of the data.

    The models are built from their specs (no teacher training or checkpoint needed: shapes do not
    depend on weights).
    """

    b = check_data(cfg)
    example = b.x_train[: min(len(b.x_train), cfg.data.batch_size)]
    out = []
    if cfg.teacher is not None and which in ("teacher", "both"):
        teacher = ensemble_architecture(cfg, b.num_classes)
        check_forward(teacher, example, "teacher.model", data_name=b.name)
        out += list_layers(teacher, example, "teacher")
    if which in ("student", "both"):
        student = build_model(cfg.student, b.num_classes, "student")
        check_forward(student, example, "student", b.num_classes, b.name)
        out += list_layers(student, example, "student")
    return out


def probe_layer_accuracies(cfg: ExperimentConfig, pooling: str) -> dict[str, float]:
    """Validation accuracy of a Probe-KD probe (``pooling``, default l2 and iterations) on every teacher layer
    whose output has a batch dimension, through the teacher cache (the teacher is trained if need be)."""

    if cfg.teacher is None:
        raise ConfigError("teacher", None, "a teacher (probes are fitted on its layers)")
    options = ProbeKD.Options
    try:
        opts = options(pooling=pooling)
    except ValidationError as e:
        raise ConfigError("--probes", pooling, config_error_from(e, root=options).allowed) from None
    check_devices(cfg)
    list_model_layers(cfg, "teacher")  # data and teacher checked before the teacher is trained
    prep = prepare(cfg)
    b = prep.bundle
    example = b.x_train[: min(len(b.x_train), cfg.data.batch_size)]
    paths = [i.path for i in list_layers(prep.teacher, example, "teacher") if i.shape and i.shape[0] == len(example)]
    req = CacheRequest((), tuple(ProbeSpec(p, pooling, opts.l2, opts.max_iter) for p in paths), cfg.teacher_cache.dtype)
    cache = get_cache(prep.teacher, b, req, cache_root=cfg.cache_dir, info=cache_info(cfg),
                      batch_size=cfg.data.eval_batch_size)
    return {r["layer"]: r["val_acc"] for r in cache.manifest["probes"] if r["pooling"] == pooling and r["layer"] in paths}
