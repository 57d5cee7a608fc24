"""D2NetTrainer: D²-Net (Yang et al., IEEE TMI 2022) trained with nnU-Net.

``nnUNetv2_train D CONFIG FOLD -tr D2NetTrainer`` trains the network of
:mod:`nnunet_missingmod.networks.d2net` on nnU-Net's plans, data loading and augmentation, with the
total loss of eq. 11::

    L = L_seg + r(e) λ1 (L_SFMC + w_rec L_rec) + r(e) λ2 (L_ADT-KD + w_aux L_aux + w_consis L_consis) + L_proj

* L_seg: nnU-Net's own region loss (Dice + BCE, deep supervision) on the student's output;
* L_SFMC = w_spatial L_spatial + w_frequency L_frequency (:mod:`nnunet_missingmod.losses.contrastive`);
* L_ADT-KD = w_kd_feature L_feature + w_kd_logit L_KL, L_aux, L_consis and L_rec
  (:mod:`nnunet_missingmod.losses.distillation`, which also documents how each term is normalised:
  per-element means and a mean over stage pairs, so λ1 = λ2 = 1 here is not the paper's weighting
  of sums);
* L_proj fits the distillation projections when the feature term is off (logit-only ablation);
  it moves nothing but the projections;
* r(e) = min(1, (e + 1) / warmup_epochs) ramps the auxiliary terms in over the first
  ``warmup_epochs`` epochs (0: no ramp, the paper's setting).

Optimiser: nnU-Net's SGD with its poly schedule by default; ``d2net.optimizer: "adam"`` uses Adam with
nnU-Net's ``initial_lr`` and ``weight_decay`` and the same poly schedule. ``D2NetTrainer_adam`` is the
paper's recipe (Adam, lr 3e-4, weight decay 5e-5, 400 epochs; nnU-Net's epochs are 250 iterations).

``teacher_full_resolution: "auto"`` (default) decodes the teacher up to full resolution, as the paper
does, when training on CUDA, and stops one stage below it on a CPU, where the full-resolution stage
costs more than the rest of the teacher (see :mod:`nnunet_missingmod.networks.d2net`). The
inference network has no teacher, so the choice never affects prediction.

Settings live in ``trainer_configs/D2NetTrainer.json``: ``d2net.network`` shapes the network (read
again by ``nnUNetv2_predict``, so change it through a variant rather than at training only) and
``d2net.loss`` holds λ1, λ2, τ, the slice fractions of the contrastive loss and the per-term weights;
``modality_dropout`` as in ModalityDropoutTrainer: a quarter of the draws kept complete before the scheme's own
draw (``p_keep_all`` 0.25; the paper zeroes random subsets, ``p_keep_all`` 0).
Dropout is drawn in ``train_step`` (numpy's stream) so that the availability mask reaches the losses.

Every term is averaged per epoch, written to nnU-Net's training log and stored in its logger (so it
is in the checkpoint), and plotted to ``progress_d2net.png`` next to nnU-Net's ``progress.png``, with
``sfmc_uninformative``, the value each L_SFMC term takes for codes that ignore the image (not part of the
loss): the contrastive terms only teach the codes something once they fall below it.

The ablations of the paper's Table II (rows 1-7; row 8 is D2NetTrainer) and Table IV are variants that
only change the config: ``D2NetTrainer_baseline``, ``_spatialOnly``, ``_frequencyOnly``, ``_noKD``,
``_featureKDOnly``, ``_logitKDOnly``, ``_noSFMC`` (Table II) and ``_noETM`` (Table IV).

Deviation: D²-Net needs one binary map per tumour region, so the dataset must use nnU-Net's
region-based training (``regions_class_order`` in ``dataset.json``, as the BraTS datasets of this
package do); the trainer refuses label-based datasets with a clear error.
"""

from __future__ import annotations

from functools import partial
from os.path import join

import matplotlib
import numpy as np
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch._dynamo import OptimizedModule

from nnunet_missingmod.config import load_trainer_config
from nnunet_missingmod.losses.contrastive import sfmc_loss, slice_offsets, uninformative_code_loss
from nnunet_missingmod.losses.distillation import adt_kd_loss, auxiliary_loss, consistency_loss, reconstruction_loss
from nnunet_missingmod.networks.d2net import D2Net
from nnunet_missingmod.trainers.base import MultiTermLossTrainer

#: Loss terms logged every epoch (``loss_<name>`` in nnU-Net's logger).
LOSS_TERMS = ("seg", "sfmc_spatial", "sfmc_frequency", "sfmc_uninformative", "rec", "kd_feature", "kd_logit",
              "kd_projection", "aux", "consis")
#: Logged for reference only, not part of the loss: each L_SFMC term's value for codes that ignore the image.
REFERENCE_TERMS = ("sfmc_uninformative",)


def resolve_teacher_full_resolution(setting: bool | str, device_type: str) -> bool:
    """``teacher_full_resolution`` as a bool: ``"auto"`` means full resolution on CUDA, one stage below elsewhere."""
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        return device_type == "cuda"
    raise ValueError(f"d2net.network.teacher_full_resolution must be true, false or \"auto\", got {setting!r}")


class D2NetTrainer(MultiTermLossTrainer):
    """nnU-Net trainer for D²-Net; see the module docstring for the loss and settings."""

    loss_terms = LOSS_TERMS

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True, *,
                                   teacher_full_resolution: bool | None = None) -> torch.nn.Module:
        # a classmethod, so that a variant's config shapes its own network in training and in nnUNetv2_predict
        settings = load_trainer_config(cls)["d2net"]["network"]
        if teacher_full_resolution is None:  # "auto" outside a trainer: CUDA if there is one (no teacher at inference)
            teacher_full_resolution = resolve_teacher_full_resolution(settings["teacher_full_resolution"],
                                                                      "cuda" if torch.cuda.is_available() else "cpu")
        return D2Net(num_modalities=num_input_channels, num_regions=num_output_channels,
                     arch_class_name=configuration_manager.network_arch_class_name,
                     arch_kwargs=configuration_manager.network_arch_init_kwargs,
                     arch_kwargs_req_import=configuration_manager.network_arch_init_kwargs_req_import,
                     deep_supervision=enable_deep_supervision, code_dim=settings["code_dim"],
                     code_encoder_features=tuple(settings["code_encoder_features"]),
                     shared_code_encoder=settings["shared_code_encoder"],
                     region_blocks=settings["region_blocks"], tumour_projection=settings["tumour_projection"],
                     teacher_feature_fraction=settings["teacher_feature_fraction"],
                     teacher_full_resolution=teacher_full_resolution,
                     reconstruction_feature_fraction=settings["reconstruction_feature_fraction"])

    def initialize(self) -> None:
        self.require_region_labels("one sigmoid per tumour region")
        if not self.enable_deep_supervision:
            raise ValueError(f"{type(self).__name__} trains its teacher and distillation through deep supervision; "
                             "enable_deep_supervision must stay True")
        # the trainer knows its device: resolve "auto" for it (nnU-Net calls build_network_architecture positionally)
        full = resolve_teacher_full_resolution(self.trainer_config["d2net"]["network"]["teacher_full_resolution"],
                                               self.device.type)
        self.build_network_architecture = partial(type(self).build_network_architecture, teacher_full_resolution=full)
        super().initialize()
        self.print_to_log_file(f"D2Net teacher decodes to full resolution: {full}")

    def configure_optimizers(self):
        return self.sgd_or_adam(self.trainer_config["d2net"]["optimizer"], "d2net.optimizer")

    def auxiliary_ramp(self) -> float:
        """r(e): the factor on λ1 and λ2 in epoch e (linear warm-up over ``warmup_epochs``, then 1)."""
        warmup = self.trainer_config["d2net"]["loss"]["warmup_epochs"]
        return 1.0 if warmup <= 0 else min(1.0, (self.current_epoch + 1) / warmup)

    def _network_module(self) -> D2Net:
        network = self.network.module if self.is_ddp else self.network
        return network._orig_mod if isinstance(network, OptimizedModule) else network

    def _stage_weights(self, num_stages: int, first: int) -> list[float]:
        """nnU-Net's deep-supervision weights of stages ``first``.., renormalised to sum to 1."""
        weights = getattr(self.loss, "weight_factors", None)  # nnU-Net's DeepSupervisionWrapper
        weights = np.asarray(weights if weights is not None else [1.0] + [0.0] * (num_stages - 1), dtype=float)
        weights = weights[first:]
        return (weights / weights.sum()).tolist() if weights.sum() > 0 else [1.0] + [0.0] * (len(weights) - 1)

    def compute_losses(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
        """Every term of eq. 11 and their weighted total (``"total"``) for one batch."""
        settings = self.trainer_config["d2net"]["loss"]
        dropped, available = self.drop_modalities(data)
        network = self._network_module()
        output, aux = self.network(dropped, available, return_aux=True)  # through DDP / torch.compile wrappers
        targets = target if isinstance(target, list) else [target]

        losses = {"seg": self.loss(output, target)}
        sfmc = sfmc_loss(aux["codes"], available, temperature=settings["temperature"],
                         spatial_weight=settings["w_spatial"], frequency_weight=settings["w_frequency"],
                         positive_fraction=settings["positive_fraction"],
                         negative_fraction=settings["negative_fraction"])
        losses["sfmc_spatial"], losses["sfmc_frequency"] = sfmc["spatial"], sfmc["frequency"]
        distance, window = slice_offsets(aux["codes"].shape[2], positive_fraction=settings["positive_fraction"],
                                         negative_fraction=settings["negative_fraction"])
        with torch.no_grad():  # what each term scores if the codes ignore the image: learning means falling below it
            losses["sfmc_uninformative"] = uninformative_code_loss(available, aux["codes"].shape[2],
                                                                   positive_distance=distance, negative_window=window)
        losses["rec"] = reconstruction_loss(aux["reconstruction"], dropped, available)
        kd = adt_kd_loss(aux["student_features"], aux["student_logits"], aux["teacher_features"],
                         aux["teacher_logits"], network.kd_projection, feature_weight=settings["w_kd_feature"],
                         logit_weight=settings["w_kd_logit"], detach_teacher=settings["detach_teacher"])
        losses["kd_feature"], losses["kd_logit"], losses["kd_projection"] = kd["feature"], kd["logit"], kd["projection"]
        first = aux["teacher_first_stage"]  # the teacher's largest stage is the student's stage `first`
        losses["aux"] = auxiliary_loss(aux["teacher_logits"], targets[first:], self._stage_weights(len(targets), first))
        losses["consis"] = consistency_loss(aux["teacher_logits"][0], aux["student_logits"][first])

        losses["total"] = sum(weight * losses[name] for name, weight in self.term_weights().items())
        return losses

    def term_weights(self) -> dict[str, float]:
        """The factor of each term in the total of eq. 11 this epoch (a switched-off term has weight 0)."""
        settings = self.trainer_config["d2net"]["loss"]
        modality = self.auxiliary_ramp() * settings["lambda1"]
        region = self.auxiliary_ramp() * settings["lambda2"]
        return {"seg": 1.0, "sfmc_spatial": modality * settings["w_spatial"],
                "sfmc_frequency": modality * settings["w_frequency"], "rec": modality * settings["w_rec"],
                "kd_feature": region * settings["w_kd_feature"], "kd_logit": region * settings["w_kd_logit"],
                "aux": region * settings["w_aux"], "consis": region * settings["w_consis"], "kd_projection": 1.0}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        if self.local_rank == 0:
            plot_loss_terms(self.logger.local_logger.my_fantastic_logging,
                            join(self.output_folder, "progress_d2net.png"))


def plot_loss_terms(history: dict, filename: str) -> None:
    """Curves of the D²-Net loss terms over the epochs, written to ``filename``.

    L_seg (nnU-Net's Dice + BCE, negative once Dice dominates) on a linear axis; the other terms, all
    non-negative, on a log axis.
    """
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    sizes = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
             "ytick.labelsize": 9, "legend.fontsize": 9}  # nnU-Net's progress plot enlarges seaborn's fonts
    with plt.rc_context(sizes):
        fig, (ax_seg, ax_terms) = plt.subplots(1, 2, figsize=(12, 4.5))
        for name in LOSS_TERMS:
            values = np.asarray(history.get(f"loss_{name}", []), dtype=float)
            if not values.size:
                continue
            if name == "seg":
                ax_seg.plot(np.arange(values.size), values, color="tab:blue", linewidth=2)
            elif name in REFERENCE_TERMS:
                ax_terms.plot(np.arange(values.size), values, color="grey", linestyle="--", linewidth=1.5,
                              label="SFMC, codes ignoring the image")
            elif np.nanmax(values, initial=0) > 0:
                ax_terms.plot(np.arange(values.size), np.clip(values, 1e-8, None), label=name, linewidth=2)
        ax_seg.set(title="L_seg (nnU-Net's loss on the student)", xlabel="epoch", ylabel="epoch mean")
        ax_terms.set(title="D²-Net terms (unweighted)", xlabel="epoch", yscale="log")
        ax_terms.legend(loc="best", ncol=2)
        fig.tight_layout()
        fig.savefig(filename, dpi=100)
        plt.close(fig)


class D2NetTrainer_baseline(D2NetTrainer):  # noqa: N801 (nnU-Net's variant naming)
    """Table II, row 1: neither SFMC nor ADT-KD (the network, L_rec, L_aux and L_consis remain)."""


class D2NetTrainer_spatialOnly(D2NetTrainer):  # noqa: N801
    """Table II, row 2: the spatial contrastive term only (no frequency term, no distillation)."""


class D2NetTrainer_frequencyOnly(D2NetTrainer):  # noqa: N801
    """Table II, row 3: the frequency contrastive term only (no spatial term, no distillation)."""


class D2NetTrainer_noKD(D2NetTrainer):  # noqa: N801
    """Table II, row 4: SFMC (spatial + frequency) without distillation."""


class D2NetTrainer_featureKDOnly(D2NetTrainer):  # noqa: N801
    """Table II, row 5: feature-level distillation only (no logit term, no SFMC)."""


class D2NetTrainer_logitKDOnly(D2NetTrainer):  # noqa: N801
    """Table II, row 6: logit-level (KL) distillation only (no feature term, no SFMC)."""


class D2NetTrainer_noSFMC(D2NetTrainer):  # noqa: N801
    """Table II, row 7: both distillation terms without SFMC."""


class D2NetTrainer_noETM(D2NetTrainer):  # noqa: N801
    """Table IV: no tumour modality projection E_TM; every region is conditioned on the mean modality code."""


class D2NetTrainer_adam(D2NetTrainer):  # noqa: N801
    """The paper's optimiser: Adam, lr 3e-4, weight decay 5e-5, 400 epochs (Sec. IV-B)."""


VARIANTS = (D2NetTrainer_adam, D2NetTrainer_baseline, D2NetTrainer_noSFMC, D2NetTrainer_spatialOnly,
            D2NetTrainer_frequencyOnly, D2NetTrainer_noKD,
            D2NetTrainer_featureKDOnly, D2NetTrainer_logitKDOnly, D2NetTrainer_noETM)
