"""The model and the kernels never build a dense N x N mask: only AttnSlices.to_dense does,
for tests and the reference attention. A FastVideo-style regression (a block-causal flag lost on
the way) is caught by the chunk-causality tests; this one catches a dense mask creeping in."""

import os
import re

from conftest import REPO

ALLOWED = {os.path.join("parallel", "mask.py")}  # defines to_dense (reference only)
SOURCE_DIRS = ("magitrain", "parallel", "data_pipeline", "launch")


def test_no_dense_mask_outside_reference():
    offenders = []
    for top in SOURCE_DIRS:
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO)
                if rel in ALLOWED:
                    continue
                text = open(path).read()
                if re.search(r"\.to_dense\(", text):
                    offenders.append(rel)
    assert offenders == [], f"dense masks built in {offenders}"
