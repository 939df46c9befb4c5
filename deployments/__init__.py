"""Deployments as code (nightly finetune on the `gpu` work pool)."""
