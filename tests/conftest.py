import torch

# `make test` runs two xdist workers on two cores: one torch thread each avoids oversubscription,
# which slows small-tensor work by orders of magnitude on a busy machine.
torch.set_num_threads(1)
