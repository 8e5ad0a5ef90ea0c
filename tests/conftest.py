"""Shared test set-up: CPU only, quiet logs, deterministic threading."""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
