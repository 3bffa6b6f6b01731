"""ehrxdiff: an open, reproducible reimplementation of EHRXDiff (Kyung et al., CHIL 2025).

Predict a patient's next chest X-ray from the previous one and the EHR events in between.
The package is thin on purpose: the numbered notebooks orchestrate, the modules here do the work.
Nothing in this package downloads anything; every pretrained component loads from a local file.
"""
import os as _os

# A load by hub name must fail at once instead of retrying for ~70 s (no hub is reachable).
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"
