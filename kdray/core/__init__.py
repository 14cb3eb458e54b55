"""Layer 2, the core: plain PyTorch. Hooks, distillation methods, probes, the distiller and its training loop,
teacher signals, the teacher-output cache, the model-file format and compression. Imports torch, numpy,
pyarrow and kdray.config; never Ray, MLflow or Optuna.
"""
