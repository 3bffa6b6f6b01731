"""Models: the networks of the paper's Fig. 1, built from config.

``clip`` the CXR–EHR CLIP (§II-C) · ``vae`` the first-stage autoencoder · ``adaptor`` the fusion of I_prev and
S_event tokens (Table IV) · ``ldm`` the conditional UNet and its conditioning (Eq. 2) · ``pipeline`` the diffusers
pipeline that samples I_pred (with event guidance) · ``sampling`` writing a split's predictions.
"""
