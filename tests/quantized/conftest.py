"""Quantized base layers run on CPU with tiny models: one thread is faster than several."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import torch

torch.set_num_threads(1)
