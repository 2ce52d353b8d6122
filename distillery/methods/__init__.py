"""One-step distillation methods, by the name params.yaml uses."""

from distillery.methods.diff_instruct import DiffInstruct
from distillery.methods.gdd import GDD, GDDI
from distillery.methods.sid import SiD
from distillery.methods.sim import SIM

METHODS = {"sid": SiD, "sim": SIM, "diff_instruct": DiffInstruct, "gdd": GDD, "gdd_i": GDDI}
