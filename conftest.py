"""pytest setup shared by all tests: no network, 2 CPU threads, repository root importable."""

import os
import sys

# Set before anything imports transformers / huggingface_hub: tests must never download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(2)
