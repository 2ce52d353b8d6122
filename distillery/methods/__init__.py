"""One-step distillation methods, by name."""

from distillery.methods.sid import SiD

METHODS = {'sid': SiD}
