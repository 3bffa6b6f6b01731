"""Simulation: the model as a clinical simulation tool (§V's outlook; notebook 07).

``whatif`` edit S_event and predict again · ``uncertainty`` many samples per pair and calibration · ``rollout``
chained predictions across an admission · ``sampler_study`` DDIM against DPM-Solver++ by steps and wall time.
"""
