"""Shipped trainer hyper-parameters (``<TrainerName>.json``); see :mod:`nnunet_missingmod.config`."""
