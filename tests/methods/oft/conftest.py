"""The oft tests run tiny models: one CPU thread is much faster than several."""

import torch

torch.set_num_threads(1)
