"""Training: the loops that fit the models, resumable from checkpoints.

``loop`` checkpoints, histories and the LR schedule shared by every loop · ``train_clip`` the contrastive loss of
§II-C · ``train_ldm`` the denoising loss of Eq. 2 and the conditioning-sensitivity check · ``cache`` the
first-stage posteriors and frozen CLIP tokens computed once, so a training step runs only the UNet.
"""
