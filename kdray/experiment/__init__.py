"""Layer 4, one experiment: configs checked against the registries, the teachers, up-front checks on real data
and models, one run from config to saved student, and search spaces as sets of run configs. Imports the
layers below; never Ray, MLflow or Optuna.
"""
