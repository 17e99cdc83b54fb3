import os

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The suite builds hundreds of short-lived systems: observe eagerly by default here (each would otherwise
# compile at its first training step). Tests of the compiled observer ask for it explicitly.
os.environ.setdefault("CHRONOMOE_COMPILE_OBSERVERS", "0")
