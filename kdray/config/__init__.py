"""Layer 1, the schema: the config models, reading YAML strictly, dotted overrides, and pydantic errors as
ConfigErrors. Imports pydantic, yaml and the base modules (kdray.errors) only; the rules that need the
registries are :mod:`kdray.experiment.configs`.
"""
from kdray.config.errors import FINITE, config_error_from
from kdray.config.loading import (MAX_YAML_BYTES, MAX_YAML_VALUES, OVERRIDE_FORM, apply_overrides, check_finite,
                                  parse_yaml, read_yaml, set_dotted)
from kdray.config.schema import (DataConfig, DistillConfig, ExperimentConfig, ExportConfig, ModelSpec, OptimConfig,
                                 Strict, TeacherCacheConfig, TeacherConfig, TeacherRecipe, TermConfig, TrainConfig,
                                 check_run_name, stable_hash)

__all__ = ["DataConfig", "DistillConfig", "ExperimentConfig", "ExportConfig", "FINITE", "MAX_YAML_BYTES",
           "MAX_YAML_VALUES", "ModelSpec", "OVERRIDE_FORM", "OptimConfig", "Strict", "TeacherCacheConfig",
           "TeacherConfig", "TeacherRecipe", "TermConfig", "TrainConfig", "apply_overrides", "check_finite",
           "check_run_name", "config_error_from", "parse_yaml", "read_yaml", "set_dotted", "stable_hash"]
