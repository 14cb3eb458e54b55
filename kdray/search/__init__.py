"""Layer 6, Ray Tune + Optuna: the search driver and trial, the Ray Train path, Prometheus metrics. Imports
ray, optuna and every layer below.
"""
