"""kdray: knowledge distillation experiments, from one run to Ray-distributed searches tracked in MLflow."""

__version__ = "0.1.0"
