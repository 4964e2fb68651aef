import json
import math
import os
import sys

# nothing in the tests may wait on the network: the hub is unreachable on these machines
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

# The test models are tiny: one thread avoids the threading overhead that dominates them (and the
# pathological slowdowns of 2 threads on a loaded 2-core machine). Scripts keep torch's default.
torch.set_num_threads(1)


def numbers_of(run):
    """A run's numbers {path: value} (results.json's path or its loaded object), without timings and how the run
    ran (keys naming time, wall, cpu, load, threads, workers, out_dir, or ending in _s); NaN as a string, so that
    NaN equals NaN. Two runs that must agree compare equal on these."""
    skip = ("time", "wall", "cpu", "load", "threads", "workers", "out_dir")

    def leaves(x, at):
        if isinstance(x, (dict, list)):
            for k, v in (x.items() if isinstance(x, dict) else enumerate(x)):
                if not (any(w in str(k) for w in skip) or str(k).endswith("_s")):
                    yield from leaves(v, at + (str(k),))
        else:
            yield at, "nan" if isinstance(x, float) and math.isnan(x) else x
    return dict(leaves(json.load(open(run)) if isinstance(run, (str, os.PathLike)) else run, ()))


@pytest.fixture
def run_numbers():
    return numbers_of
