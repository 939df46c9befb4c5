"""Prefect tasks, one module per stage: each wraps plain functions from `slmforge` with
caching, retries, logging and artifacts. Stages pass small JSON records (store keys + metrics),
never models."""
