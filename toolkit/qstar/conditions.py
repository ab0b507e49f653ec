"""The seed's three conditions on q* samples, as numbers (torch-free, so `analyze` stays light).

``meets_ess``: ESS ratio in :data:`ESS_RATIO_RANGE`; ``meets_kl``: |KL_θ − KL_t| below
:data:`KL_GAP_MAX`; ``meets_alpha``: α in :data:`ALPHA_RANGE`.
"""

ESS_RATIO_RANGE = (0.8, 1.2)
KL_GAP_MAX = 0.05
ALPHA_RANGE = (0.2, 0.8)
