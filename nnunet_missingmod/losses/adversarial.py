"""Adversarial and cycle losses of the package's GAN trainers, as plain functions on tensors.

Each function cites the equation it implements; tests compare them with naive references.
"""

from __future__ import annotations


# ---- WGAN-GP and classification terms (UTAD-Net, StarGAN-style) ----------------------------------------------

# ---- end of WGAN-GP section ---------------------------------------------------------------------------------

# ---- least-squares GAN and cycle terms (CMFT, Zhang et al. 2021, eq. 2-6) ----------------------------------

# ---- end of least-squares section ---------------------------------------------------------------------------
