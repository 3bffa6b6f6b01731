"""Evaluation: what scores a film and how (§III-A).

``evaluators`` the CXR classifier that reads findings, age and sex off an image · ``metrics`` AUROC on all / diff /
same, FID, age r, sex AUROC, image similarity · ``baselines`` the table classifiers of Table II · ``identity``
patient re-identification (does a prediction follow I_prev) · ``claims`` the paper's claims as tests that can
fail · ``label_free`` what a run without finding labels can report.
"""
