"""Diagnosis of batch-norm problems: compare two models, lint one."""
