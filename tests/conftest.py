"""Test-session settings: tiny problems run fastest (and without oversubscription) on one thread."""

import torch

torch.set_num_threads(1)
