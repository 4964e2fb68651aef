import os
import sys

# nothing in the tests may wait on the network: the hub is unreachable on these machines
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

# The test models are tiny: one thread avoids the threading overhead that dominates them (and the
# pathological slowdowns of 2 threads on a loaded 2-core machine). Scripts keep torch's default.
torch.set_num_threads(1)
