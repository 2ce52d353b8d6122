"""One module per distillation method; distillery/registry.py names them, with their settings."""
