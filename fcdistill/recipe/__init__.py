"""Recipes: one YAML file describing a whole distillation run, and `fcd run`, which runs it."""
