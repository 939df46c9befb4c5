"""Prefect flows: finetune (and, later, compare)."""
