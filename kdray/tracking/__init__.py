"""Layer 5, MLflow: the runs of a search and of ``kdray train``, the model registry and ``promote``. Imports
mlflow and the layers below; only :mod:`kdray.tracking.tune_callback` imports Ray.
"""
