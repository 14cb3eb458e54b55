"""Layer 4, Ray Tune + Optuna: ``kdray search``. Imports ray, optuna and every layer below.

- :mod:`~kdray.search.driver`: :func:`run_search`, as its named steps (plan, Ray, shared inputs, Tune, results,
  baseline, MLflow end).
- :mod:`~kdray.search.searcher`: the Tune searcher that owns the Optuna study (ask/tell; pruned trials PRUNED).
- :mod:`~kdray.search.tuner`: the trainable, the ASHA early stopper, the Tuner (fresh or restored for --resume).
- :mod:`~kdray.search.trial`: one trial (the function trainable), its checkpoint, the hard-label baseline.
- :mod:`~kdray.search.distributed`: a trial of several workers as a Ray Train ``TorchTrainer``.
- :mod:`~kdray.search.callbacks`: driver-side Tune callbacks (progress bar; this run's callbacks on --resume).
- :mod:`~kdray.search.ray_cluster`: connecting to Ray and checking the cluster can hold a trial.
- :mod:`~kdray.search.prometheus`: the search's Prometheus gauges. :mod:`~kdray.search.results`: the trials table.
"""
