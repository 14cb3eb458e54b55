"""Up-front checks against the real data, models, devices and folders: what the config schema cannot see.

Each check raises a :class:`~kdray.errors.ConfigError` naming the config field (or command-line option), the
bad value and what is allowed, before any work starts: no teacher trained, no cache entry written, no Ray
started, no MLflow run opened. :func:`check_experiment` and :func:`kdray.experiment.space.check_space` run
them for ``kdray train`` and ``kdray search``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from kdray.config import ExperimentConfig, TrainConfig
from kdray.core.bundle import DataBundle
from kdray.core.hooks import check_paths, inputs_for, output_shapes
from kdray.core.methods import LOGITS, METHODS
from kdray.core.signals import probe_specs
from kdray.core.step import check_compile, check_precision
from kdray.core.text import load_tokenizer, tokenizer_difference
from kdray.core.train import Distiller, resolve_device
from kdray.data import make_bundle
from kdray.errors import ConfigError, first_line
from kdray.experiment.teachers import ensemble_architecture
from kdray.models import build_model, loads_weights


def check_device(name: str, field: str) -> None:
    """``cuda``/``cuda:N``/``mps`` only where this torch can reach such a device (``auto`` always works)."""
    if name.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name[5:]) if name.startswith("cuda:") else 0
        if index >= n:
            have = f"cuda:0 .. cuda:{n - 1}" if n else "no CUDA device (torch.cuda.is_available() is False)"
            raise ConfigError(field, name, f"auto or cpu, or a device this machine has: it has {have}")
    elif name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(field, name, "auto or cpu: torch here has no MPS device (torch.backends.mps.is_available() "
                                       "is False)")


def check_bundle(b: DataBundle, field: str) -> None:
    """Training examples, labelled ones, test examples and at least 2 classes."""
    n = len(b.x_train) + len(b.x_val)
    if len(b.x_train) == 0:
        raise ConfigError(f"{field}.val_fraction", f"0 training examples of {n}",
                          "a split that leaves training examples: a lower val_fraction or more examples")
    if b.n_labelled == 0:
        raise ConfigError(f"{field}.label_fraction", f"0 labelled examples of {len(b.x_train)}",
                          "a label_fraction that leaves labelled training examples")
    if len(b.x_test) == 0:
        raise ConfigError(f"{field}.params", "0 test examples", "data with a test split (test accuracy is measured "
                                                                "on it)")
    if b.num_classes < 2:
        raise ConfigError(f"{field}.params", f"{b.num_classes} class", "data with at least 2 classes (check "
                                                                       "label_map)")


def check_forward(model: nn.Module, example: torch.Tensor, field: str, num_classes: Optional[int] = None,
                  data_name: str = "") -> torch.Size:
    """Run ``model`` on two examples: a model whose input does not fit the data, or (``num_classes`` given)
    whose output classes differ from the data's, is refused naming ``<field>.kwargs`` (``field`` is the model
    spec's place: ``student``, ``teacher.model``). Returns the output shape."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(inputs_for(model, example[:2]))
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise ConfigError(f"{field}.kwargs", f"inputs of shape {tuple(example.shape[1:])} from data set {data_name!r}",
                          f"a model whose forward accepts them (it failed: {first_line(e)}); set its kwargs (e.g. "
                          "in_length) to the data, or change data.params") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(field, f"output {shape}", "a model returning logits of shape (B, classes)")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ConfigError(f"{field}.kwargs", f"{out.shape[1]} output classes",
                          f"{num_classes} classes (those of data set {data_name!r}): drop num_classes from its "
                          "kwargs, or match the data")
    return out.shape


def build_distiller(cfg: ExperimentConfig, teacher: Optional[nn.Module], num_classes: int, example: torch.Tensor,
                    data_name: str = "", teacher_example: Optional[torch.Tensor] = None,
                    two_views: bool = False) -> Distiller:
    """Student + terms with adapters, after checking every layer path and shape on one batch (``example`` for the
    student, ``teacher_example`` for the teacher when it reads inputs of its own: ``two_views``).

    Needs only the architectures (weights do not matter), so a search checks its whole space with it
    before any teacher is trained.
    """
    t_example = example if teacher_example is None else teacher_example
    check_views(cfg, two_views, data_name)
    student = build_model(cfg.student, num_classes, "student").to(example.device)
    distiller = Distiller(student, cfg.distill)
    teacher_classes = None
    if teacher is not None:
        with torch.no_grad():
            teacher_classes = teacher.eval()(inputs_for(teacher, t_example[:2])).shape[1]
    for i, term in enumerate(cfg.distill.terms):
        check_paths(student, term.student_layers, f"distill.terms[{i}].student_layers")
        if teacher is not None:
            check_paths(teacher, term.teacher_layers, f"distill.terms[{i}].teacher_layers")
        if (METHODS.get(term.method).uses_teacher_logits or cfg.distill.scheme == "online") and \
                teacher_classes != num_classes:
            raise ConfigError("teacher.model", f"{teacher_classes} output classes",
                              f"{num_classes} classes (those of data set {data_name!r}) for method {term.method!r}, "
                              f"which reads the teacher's logits; use {_not_logit_methods()} with this teacher")
    if cfg.distill.scheme == "online" and any(m.uses_probes for m in distiller.terms):
        raise ConfigError("distill.scheme", "online", "offline when a term reads probes (probes are fitted on a "
                                                      "frozen teacher)")
    s_shapes = output_shapes(student, example, distiller.student_layers, "student_layers")
    was_training = student.training
    with torch.no_grad():
        s_shapes[LOGITS] = student.eval()(example[:2]).shape  # for heads on the student (self_aux)
    student.train(was_training)
    t_shapes = output_shapes(teacher, t_example, distiller.teacher_layers, "teacher_layers") if teacher is not None \
        else {}
    distiller.build(s_shapes, t_shapes)
    return distiller.to(example.device)


def check_views(cfg: ExperimentConfig, two_views: bool, data_name: str) -> None:
    """When teacher and student read different inputs (another prompt or tokenizer), a term comparing their
    features position by position, and online training of the teacher on the student's inputs, are refused."""
    if not two_views:
        return
    for i, term in enumerate(cfg.distill.terms):
        if METHODS.get(term.method).position_aligned:
            usable = ", ".join(c.name for c in METHODS.classes() if c.needs_teacher and not c.position_aligned)
            raise ConfigError(f"distill.terms[{i}].method", term.method,
                              f"a method that does not match teacher and student positions one to one: teacher and "
                              f"student read different token sequences here (data set {data_name!r} has a "
                              f"student_tokenizer or student_template of its own); use {usable}")
    if cfg.distill.scheme == "online":
        raise ConfigError("distill.scheme", "online", "offline: teacher and student read different inputs here, and "
                                                      "the online teacher learns on the student's batches")


def check_teacher_sources(cfg: ExperimentConfig) -> None:
    """A teacher with neither ``checkpoint`` nor ``recipe`` must be a model that loads trained weights of its own;
    the teachers of an ensemble share one tokenizer (:func:`check_teacher_tokenizers`)."""
    for where, t in teacher_sections(cfg):
        if t.checkpoint is None and t.recipe is None and not loads_weights(t.model):
            raise ConfigError(f"{where}.checkpoint", None,
                              f"a checkpoint file, or a {where}.recipe to train it: model {t.model.name!r} has no "
                              "trained weights of its own (hf_causal_lm and a fine-tuned hf_sequence_classifier "
                              "folder do)")
    check_teacher_tokenizers(cfg)


TOKEN_TEACHERS = ("hf_causal_lm", "hf_sequence_classifier")  # models that read a tokenizer's ids


def check_teacher_tokenizers(cfg: ExperimentConfig) -> None:
    """Every extra Hugging Face teacher (``hf_causal_lm``, ``hf_sequence_classifier``) has the tokenizer the data set renders the teacher view
    with: the data holds one teacher view, so each teacher of an ensemble is given the same token ids. Tokenizers
    are compared by vocabulary and behaviour (:func:`~kdray.core.text.tokenizer_difference`), not by folder."""
    view = cfg.data.params.get("teacher_tokenizer") or cfg.data.params.get("tokenizer")
    lms = [(i, t.model.kwargs) for i, t in enumerate(cfg.extra_teachers) if t.model.name in TOKEN_TEACHERS]
    if not view or not lms:
        return
    view_field = f"data.params.{'teacher_tokenizer' if cfg.data.params.get('teacher_tokenizer') else 'tokenizer'}"
    shared = None
    for i, kwargs in lms:
        key = "tokenizer" if kwargs.get("tokenizer") else "path"
        own, field = kwargs.get(key), f"extra_teachers[{i}].model.kwargs.{key}"
        if not own or own == view:
            continue
        shared = shared or load_tokenizer(view, view_field)
        why = tokenizer_difference(shared, load_tokenizer(own, field))
        if why:
            raise ConfigError(field, own, f"a teacher with the tokenizer of the data's teacher view ({view_field}="
                                          f"{view}): all teachers of an ensemble must share the tokenizer the data "
                                          f"set renders the teacher view with (each is given the same token ids); "
                                          f"this one differs: {why}")


def _not_logit_methods() -> str:
    """The methods that work with a teacher whose classes are not the task's: those reading probes or layers."""
    names = [c.name for c in METHODS.classes() if c.needs_teacher and not c.uses_teacher_logits]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def check_experiment(cfg: ExperimentConfig) -> None:
    """Everything about ``cfg`` that only the real data and models show (devices, data splits, model inputs and
    classes, every layer path and shape), on freshly built models (weights do not matter): a bad value stops a
    run before a teacher is trained or loaded."""
    check_devices(cfg)
    check_teacher_sources(cfg)
    b = check_data(cfg)
    example = b.x_train[: min(8, len(b.x_train))]
    teacher = ensemble_architecture(cfg, b.num_classes) if cfg.teacher is not None else None
    check_models(cfg, teacher, b, example)


def check_devices(cfg: ExperimentConfig, student: bool = True) -> None:
    """The student's device and precision (unless a search gives its trials GPUs this machine may lack) and
    every teacher recipe's (teachers are trained here)."""
    if student:
        check_train_device(cfg.train, "train")
    for where, t in teacher_sections(cfg):
        if t.recipe is not None:
            check_train_device(t.recipe.train, f"{where}.recipe.train")


def check_train_device(train: TrainConfig, field: str) -> None:
    """``train.device`` exists here and can train in ``train.precision`` (and compile the model if asked)."""
    check_device(train.device, f"{field}.device")
    check_precision(train.precision, resolve_device(train.device), f"{field}.precision")
    check_compile(train.compile, resolve_device(train.device), f"{field}.compile")


def check_data(cfg: ExperimentConfig) -> DataBundle:
    """The experiment's data bundle, and every teacher recipe's, checked for examples, labels and classes."""
    b = make_bundle(cfg.data, cfg.cache_dir)
    check_bundle(b, "data")
    for where, t in teacher_sections(cfg):
        if t.recipe is not None and t.recipe.data is not None:
            check_bundle(make_bundle(t.recipe.data, cfg.cache_dir), f"{where}.recipe.data")
    return b


def check_models(cfg: ExperimentConfig, teacher: Optional[nn.Module], b: DataBundle, example: torch.Tensor) -> None:
    """Student and teacher run on the data's inputs, the student has the data's classes, and every term's layers
    exist and fit the method (:func:`build_distiller`)."""
    t_example = b.teacher_x("train")[:len(example)]
    check_forward(build_model(cfg.student, b.num_classes, "student"), example, "student", b.num_classes, b.name)
    if teacher is not None:
        check_forward(teacher, t_example, "teacher.model", data_name=b.name)
    with torch.no_grad():
        build_distiller(cfg, teacher, b.num_classes, example, b.name, t_example, b.two_views).close()


def teacher_sections(cfg: ExperimentConfig) -> list[tuple[str, Any]]:
    """(config field, section) of the main teacher and every extra teacher."""
    main = [("teacher", cfg.teacher)] if cfg.teacher is not None else []
    return main + [(f"extra_teachers[{i}]", t) for i, t in enumerate(cfg.extra_teachers)]
