"""Evaluation: per-gene metrics (``metrics``) and protocols x seeds x methods comparisons (``protocol``)."""
