"""Common base of this package's trainers: config loading and recording.

nnU-Net instantiates trainers with the fixed signature ``(plans, configuration, fold, dataset_json,
device)``, so hyper-parameters come from ``trainer_configs/<TrainerName>.json`` (see
:mod:`nnunet_missingmod.config`). The ``nnunet`` section sets nnU-Net's own trainer attributes
(``num_epochs``, ``num_iterations_per_epoch``, ...). ``inference.test_time_mirroring: false`` stores no
mirroring axes in the checkpoint, so nnU-Net's final validation and ``nnUNetv2_predict`` run without
mirroring test-time augmentation (8x fewer forward passes in 3D; used by the CPU demo). The other
sections belong to the subclasses.

Missing modalities stay missing in training, for every trainer of the package: the training transforms
record which channels a sample has before nnU-Net's augmentation and zero the others again at the end
(:mod:`nnunet_missingmod.transforms.missing_modalities`), so noise or brightness changes never turn a
sequence that the case lacks into a "present" one.

DDP: nnU-Net wraps the network in ``DistributedDataParallel(find_unused_parameters=False)``, which fails
(at the next step) when a parameter gets no gradient, as in ablations that switch a term off or batches in
which a term has nothing to compare. :class:`MultiTermLossTrainer` therefore adds ``0 * sum(p)`` over all
parameters to the total under DDP, so every parameter takes part in every backward pass (see
:meth:`MultiTermLossTrainer.loss_for_backward` for why this rather than ``find_unused_parameters=True``).

Case sampling (config section ``case_sampling``, default ``null``: nnU-Net's uniform draw of training cases):
``{"cases_without": "enhancing tumor", "share": 0.25}`` draws the training cases whose reference lacks that
``dataset.json`` label in the given share of the samples (uniformly among them), the other cases in the rest. A
rare kind of case, such as a tumour without enhancement, then supplies more of the counter-examples the network
needs to leave that label empty. Which cases lack the label is read from the ``class_locations`` that nnU-Net's
preprocessing stores in each case's ``.pkl``; the draw is nnU-Net's own (``nnUNetDataLoader``'s
``sampling_probabilities``).

Numerical faults: every training step's losses are checked (on the values nnU-Net copies to the CPU anyway,
so no extra synchronisation). A NaN or Inf loss stops training with :class:`NonFiniteLossError`, naming the
epoch, the iteration and the non-finite term(s); the run ends before ``on_epoch_end``, so no checkpoint is
written after the fault and the last one on disk holds finite weights from an earlier epoch. As a second
guard, :meth:`MissingModTrainerBase.save_checkpoint` refuses to write weights that are not finite
(:class:`NonFiniteWeightsError`). Under DDP the rank that sees the fault raises and ``torch.multiprocessing``
ends the others.

Resuming (``nnUNetv2_train ... --c``): all the state these trainers add lives in nnU-Net's checkpoint (network
weights, including auxiliary heads; optimiser; the per-term loss logs in nnU-Net's logger), and the iteration
counter restarts with each epoch. A resumed run whose trainer config differs from the one recorded in the fold
folder says so in the training log.
"""

from __future__ import annotations

import json
import os
import tempfile
from os.path import isfile, join

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch._dynamo import OptimizedModule

from nnunet_missingmod.config import load_trainer_config
from nnunet_missingmod.transforms.missing_modalities import RecordAvailabilityTransform, ZeroMissingModalitiesTransform
from nnunet_missingmod.transforms.modality_dropout import check_curriculum, drop_modalities_in_batch, settings_at

CONFIG_FILE_NAME = "trainer_config.json"
#: Below this, SGD with nnU-Net's momentum 0.99 and poly schedule barely trains: a warning names the setting.
SGD_MIN_SENSIBLE_LR = 1e-3


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or Inf; the message names the epoch, the iteration and the term(s)."""


class NonFiniteWeightsError(FloatingPointError):
    """A checkpoint was about to be written with NaN or Inf weights; the message names the file and the tensors."""


def non_finite_terms(outputs: dict) -> dict[str, float]:
    """The entries of a ``train_step`` result that are not finite, as ``{name: value}`` (a mean for arrays)."""
    bad = {}
    for name, value in outputs.items():
        array = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(array)):
            bad[name] = float(array.mean()) if array.size else float("nan")
    return bad


class MissingModTrainerBase(nnUNetTrainer):
    """nnUNetTrainer that reads its settings from the package's trainer configs.

    Attributes:
        trainer_config: the resolved config (written to ``<fold folder>/trainer_config.json`` when training starts).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.iteration_in_epoch = 0  # training steps taken in the current epoch (for fault messages)
        self.trainer_config = load_trainer_config(type(self))
        for name, value in self.trainer_config.get("nnunet", {}).items():
            if not hasattr(self, name):
                raise KeyError(f"config key nnunet.{name} is not an attribute of nnUNetTrainer")
            setattr(self, name, value)
        self.case_sampling = self._checked_case_sampling(self.trainer_config.get("case_sampling"))

    def _checked_case_sampling(self, settings: dict | None) -> dict | None:
        """The ``case_sampling`` section, checked against ``dataset.json`` (None: nnU-Net's uniform draw)."""
        if settings is None:
            return None
        where = f"{type(self).__name__} config case_sampling"
        if not isinstance(settings, dict) or set(settings) != {"cases_without", "share"}:
            raise ValueError(f"{where} must be null or {{\"cases_without\": <dataset.json label>, \"share\": "
                             f"<0..1>}}, got {settings!r}")
        labels = {name: value for name, value in self.dataset_json["labels"].items()
                  if name not in ("background", "ignore")}
        if settings["cases_without"] not in labels:
            raise ValueError(f"{where}.cases_without is {settings['cases_without']!r}, not a foreground label of "
                             f"dataset.json; its labels: {sorted(labels)}")
        share = settings["share"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise ValueError(f"{where}.share must be a number strictly between 0 and 1, got {share!r}")
        return dict(settings)

    def case_sampling_probabilities(self, identifiers: list[str], folder: str) -> np.ndarray | None:
        """Per-case draw probabilities for the training cases ``identifiers`` (preprocessed in ``folder``).

        None (nnU-Net's uniform draw) without a ``case_sampling`` section, or when all or none of the cases lack
        the label (said in the training log). Otherwise the cases without the label share ``share`` of the
        probability equally, the others ``1 - share``.

        Raises:
            ValueError: a case's ``.pkl`` has no ``class_locations`` entry for the label (names the file).
        """
        if self.case_sampling is None:
            return None
        name, share = self.case_sampling["cases_without"], float(self.case_sampling["share"])
        value = self.dataset_json["labels"][name]
        # the keys of nnU-Net's preprocessing (DefaultPreprocessor._sample_foreground_locations): a tuple per region,
        # an int per label; a one-element list such as [3] is a plain label unless the dataset has regions
        if not isinstance(value, (list, tuple)):
            key = int(value)
        else:
            key = tuple(int(v) for v in value) if self.label_manager.has_regions else int(value[0])
        lacking = []
        for identifier in identifiers:
            path = join(folder, f"{identifier}.pkl")
            locations = load_pickle(path).get("class_locations", {})
            if key not in locations:
                raise ValueError(f"{path}: no class_locations for label {name!r} ({key}; it has "
                                 f"{sorted(locations, key=str)}); preprocess the dataset again with this dataset.json")
            lacking.append(len(locations[key]) == 0)
        lacking = np.array(lacking, dtype=bool)
        count = int(lacking.sum())
        if count in (0, len(identifiers)):
            self.print_to_log_file(f"WARNING: case_sampling: {'none' if count == 0 else 'all'} of the "
                                   f"{len(identifiers)} training cases lack {name!r}; drawing them uniformly",
                                   also_print_to_console=True)
            return None
        probabilities = np.where(lacking, share / count, (1 - share) / (len(identifiers) - count))
        self.print_to_log_file(f"case_sampling: {count} of {len(identifiers)} training cases lack {name!r} "
                               f"({', '.join(np.array(identifiers)[lacking])}); drawn in {share:.1%} of the samples "
                               f"instead of {count / len(identifiers):.1%}", also_print_to_console=True)
        return probabilities / probabilities.sum()

    def get_dataloaders(self):
        """nnU-Net's data loaders; with ``case_sampling``, the training loader draws cases with
        :meth:`case_sampling_probabilities`.

        Without it this is nnU-Net's own method. With it, the body is nnU-Net's ``get_dataloaders`` (v2.8) with the
        training loader's ``sampling_probabilities`` set: nnU-Net constructs and starts the loaders in one method,
        so the probabilities cannot be passed in from outside.
        """
        if self.case_sampling is None:
            return super().get_dataloaders()
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        tr_transforms = self.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        val_transforms = self.get_validation_transforms(
            deep_supervision_scales, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        probabilities = self.case_sampling_probabilities(list(dataset_tr.identifiers), dataset_tr.source_folder)
        loaders = [nnUNetDataLoader(dataset, self.batch_size, size, self.configuration_manager.patch_size,
                                    self.label_manager, self.oversample_foreground_percent, sampling_probabilities=p,
                                    pad_sides=None, transforms=transforms,
                                    probabilistic_oversampling=self.probabilistic_oversampling)
                   for dataset, size, p, transforms in ((dataset_tr, initial_patch_size, probabilities, tr_transforms),
                                                        (dataset_val, patch_size, None, val_transforms))]
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            augmenters = [SingleThreadedAugmenter(loader, None) for loader in loaders]
        else:
            augmenters = [NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=n,
                                                       num_cached=cached, seeds=None,
                                                       pin_memory=self.device.type == "cuda", wait_time=0.002)
                          for loader, n, cached in ((loaders[0], processes, max(6, processes // 2)),
                                                    (loaders[1], max(1, processes // 2), max(3, processes // 4)))]
        for augmenter in augmenters:
            next(augmenter)  # start the workers, as nnU-Net does
        return tuple(augmenters)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.trainer_config.get("inference", {}).get("test_time_mirroring", True):
            self.inference_allowed_mirroring_axes = None  # saved in the checkpoint; the predictor then never mirrors
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    @property
    def num_modalities(self) -> int:
        """Number of modality channels (``dataset.json``'s ``channel_names``; a cascade adds its own after them)."""
        return len(self.dataset_json["channel_names"])

    def require_region_labels(self, why: str) -> None:
        """Stop with a clear error on a label-based dataset; ``why`` says what needs one sigmoid per region.

        Raises:
            ValueError: dataset.json defines plain labels (no ``regions_class_order``).
        """
        if not self.label_manager.has_regions:
            raise ValueError(f"{type(self).__name__} needs region-based training ({why}), but dataset.json of "
                             f"{self.plans_manager.dataset_name} defines plain labels; add 'regions_class_order' "
                             "and region labels as in nnU-Net's Dataset137_BraTS21")

    def region_names(self) -> list[str]:
        """The ``dataset.json`` names of the network's output regions, in output-channel order (region-based
        training: ``label_manager.foreground_regions``, the order of the targets and of the network's outputs)."""
        names = {}
        for name, labels in self.label_manager.label_dict.items():
            names.setdefault(tuple(labels) if isinstance(labels, list) else labels, name)
        return [names[region] for region in self.label_manager.foreground_regions]

    # nnU-Net declares this hook static; it is only ever called on the trainer instance, and the number of
    # modalities (and the subclasses' dropout settings) are per instance, so it is an instance method here.
    def get_training_transforms(self, patch_size: np.ndarray | tuple[int, ...], rotation_for_DA: RandomScalar,
                                deep_supervision_scales: list | tuple | None, mirror_axes: tuple[int, ...],
                                do_dummy_2d_data_aug: bool, use_mask_for_norm: list[bool] | None = None,
                                is_cascaded: bool = False, foreground_labels: list[int] | tuple[int, ...] | None = None,
                                regions: list | None = None, ignore_label: int | None = None) -> BasicTransform:
        """nnU-Net's training transforms between recording availability (first) and re-zeroing missing channels.

        Subclasses may append transforms that only zero channels (modality dropout) after the re-zeroing.
        """
        transforms = nnUNetTrainer.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        transforms.transforms.insert(0, RecordAvailabilityTransform(num_modalities=self.num_modalities))
        transforms.transforms.append(ZeroMissingModalitiesTransform(num_modalities=self.num_modalities))
        return transforms

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.iteration_in_epoch = 0
        if check_curriculum(self.trainer_config.get("modality_dropout", {})) is not None:
            self.print_to_log_file(f"modality dropout: p_keep_all {self.dropout_settings_now()['p_keep_all']:.3f} "
                                   f"this epoch (curriculum)")

    def dropout_settings_now(self) -> dict:
        """The ``modality_dropout`` section as it applies in the current epoch (``p_keep_all`` follows the
        section's ``curriculum``, if any; :func:`~nnunet_missingmod.transforms.modality_dropout.settings_at`)."""
        return settings_at(self.trainer_config["modality_dropout"], self.current_epoch / self.num_epochs)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's training step, stopped with :class:`NonFiniteLossError` when its loss is NaN or Inf."""
        return self.check_finite_losses(super().train_step(batch))

    def check_finite_losses(self, outputs: dict) -> dict:
        """Count the step and return ``outputs``; raise :class:`NonFiniteLossError` if any loss in it is NaN/Inf.

        ``outputs`` is what ``train_step`` returns: ``loss`` (the total that was back-propagated) and, for
        :class:`MultiTermLossTrainer`, ``loss_<term>`` for each logged term.
        """
        self.iteration_in_epoch += 1
        bad = non_finite_terms(outputs)
        if not bad:
            return outputs
        terms = ", ".join(f"{'total' if name == 'loss' else name.removeprefix('loss_')}={value}"
                          for name, value in bad.items())
        message = (f"{type(self).__name__}: non-finite training loss in epoch {self.current_epoch}, iteration "
                   f"{self.iteration_in_epoch} of {self.num_iterations_per_epoch}: {terms}. Training stopped; no "
                   f"checkpoint was written after this step, so the checkpoints in {self.output_folder} hold the "
                   f"finite weights of earlier epochs. Lower the learning rate (trainer config section 'nnunet', "
                   f"'initial_lr') or the weight of the failing term, check the data, then resume with "
                   f"nnUNetv2_train ... --c")
        self.print_to_log_file(message)
        raise NonFiniteLossError(message)

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        """Modules whose weights a checkpoint holds besides ``self.network`` (a GAN trainer's discriminators)."""
        return {}

    def extra_checkpoint_state(self) -> dict:
        """State this trainer adds to nnU-Net's checkpoint (stored under ``missingmod_state``; default none)."""
        return {}

    def load_extra_checkpoint_state(self, state: dict | None, filename: str) -> None:
        """Restore what :meth:`extra_checkpoint_state` wrote (``None`` for a checkpoint without it)."""

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus :meth:`extra_checkpoint_state`, written atomically.

        Refused (:class:`NonFiniteWeightsError`) if any weight is NaN or Inf. The file is written next to its
        destination and renamed over it, so a run killed while saving leaves the previous checkpoint intact
        (nnU-Net writes in place, and a kill mid-write leaves a truncated ``checkpoint_latest.pth`` that
        ``--c`` cannot read).
        """
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        network = self.network.module if self.is_ddp else self.network
        if isinstance(network, OptimizedModule):
            network = network._orig_mod
        modules = {"network": network, **self.checkpoint_modules()}
        bad = [f"{module_name}.{name}" if module_name != "network" else name
               for module_name, module in modules.items() for name, tensor in module.state_dict().items()
               if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
        if bad:
            message = (f"{type(self).__name__}: refusing to write {filename}: {len(bad)} weight tensor(s) hold "
                       f"NaN/Inf values ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}) in epoch "
                       f"{self.current_epoch}; the checkpoints already on disk are kept")
            self.print_to_log_file(message)
            raise NonFiniteWeightsError(message)
        # the keys of nnunetv2.training.nnUNetTrainer.nnUNetTrainer.save_checkpoint, which load_checkpoint reads
        checkpoint = {
            "network_weights": network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
        }
        extra = self.extra_checkpoint_state()
        if extra:
            checkpoint["missingmod_state"] = extra
        partial = f"{filename}.partial"
        try:
            torch.save(checkpoint, partial)
            os.replace(partial, filename)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's checkpoint loading (also from a dict), then :meth:`load_extra_checkpoint_state`."""
        if isinstance(filename_or_checkpoint, dict):  # nnU-Net's own method only reads files
            checkpoint, filename = filename_or_checkpoint, "<checkpoint dict>"
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "checkpoint.pth")
                torch.save(checkpoint, path)
                super().load_checkpoint(path)
        else:
            filename = filename_or_checkpoint
            super().load_checkpoint(filename)
            checkpoint = torch.load(filename, map_location=self.device, weights_only=False) \
                if type(self).load_extra_checkpoint_state is not MissingModTrainerBase.load_extra_checkpoint_state \
                else {}
        self.load_extra_checkpoint_state(checkpoint.get("missingmod_state"), filename)

    def log_loss_terms(self, names: tuple[str, ...], train_outputs: list[dict]) -> dict[str, float]:
        """Average ``loss_<name>`` over the epoch's steps, store it in nnU-Net's logger and the training log.

        Steps that did not compute a term (a GAN generator term on a discriminator-only step) do not enter its
        mean. A run resumed from a checkpoint without a term's history gets NaN for the epochs it has no record of.
        """
        history = self.logger.local_logger.my_fantastic_logging
        terms = {}
        for name in names:
            key = f"loss_{name}"
            values = history.setdefault(key, [])
            values.extend([float("nan")] * (self.current_epoch - len(values)))
            present = [o[key] for o in train_outputs if key in o]
            terms[key] = float(np.mean(present)) if present else float("nan")
            self.logger.log(key, terms[key], self.current_epoch)
        self.print_to_log_file(", ".join(f"{k} {v:.4f}" for k, v in terms.items()))
        return terms

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.local_rank == 0:
            self._note_config_change_on_resume()
            with open(join(self.output_folder, CONFIG_FILE_NAME), "w") as f:
                json.dump({"trainer": type(self).__name__, **self.trainer_config}, f, indent=4)
            self.print_to_log_file(f"{type(self).__name__} config:\n{json.dumps(self.trainer_config, indent=2)}",
                                   also_print_to_console=False)

    def _note_config_change_on_resume(self) -> None:
        """On a resumed run (epoch > 0), log which config sections differ from those the run started with."""
        recorded = join(self.output_folder, CONFIG_FILE_NAME)
        if self.current_epoch == 0 or not isfile(recorded):
            return
        try:
            with open(recorded) as f:
                before = json.load(f)
        except (OSError, json.JSONDecodeError):
            return
        before.pop("trainer", None)
        changed = sorted(k for k in {*before, *self.trainer_config} if before.get(k) != self.trainer_config.get(k))
        if changed:
            self.print_to_log_file(f"WARNING: resuming at epoch {self.current_epoch} with a trainer config that "
                                   f"differs from the recorded one in section(s) {changed}; the run continues with "
                                   f"the current config")


class MultiTermLossTrainer(MissingModTrainerBase):
    """Base of trainers whose loss has several terms: ``compute_losses`` returns them, this class does the rest.

    * modality dropout drawn in the training step (``drop_modalities``, config section ``modality_dropout``),
      so that the availability mask reaches the loss terms;
    * nnU-Net's optimisation step (autocast on CUDA, gradient scaling, clipping at 12) on ``losses["total"]``;
    * every term named in ``loss_terms`` averaged per epoch, stored in nnU-Net's logger as ``loss_<name>``
      (so it is in the checkpoint) and written to the training log.

    Subclasses set ``loss_terms`` and implement ``compute_losses(data, target) -> {name: tensor, "total": tensor}``.
    """

    loss_terms: tuple[str, ...] = ()

    def drop_modalities(self, data: torch.Tensor, acquired: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero a random subset of modalities per sample; return the dropped batch and the (B, M) available mask.

        ``available = kept AND acquired``: a channel that is exactly zero in the batch (a sequence the case
        does not have; the training transforms re-zero those after augmentation) is never available, so it
        is never an anchor, a target or a fused modality. Every sample keeps at least one acquired modality.
        ``acquired`` (B, M) may be passed by a caller that already has it (default: read from the batch).
        The draw follows the section's ``curriculum``, if any (:meth:`dropout_settings_now`).
        """
        return drop_modalities_in_batch(data, self.dropout_settings_now(), acquired=acquired)

    def compute_losses(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sgd_or_adam(self, name: str, key: str):
        """nnU-Net's SGD (``name == "sgd"``) or Adam, both with nnU-Net's ``initial_lr``, ``weight_decay`` and poly
        schedule; ``key`` names the config key in the error for anything else."""
        if name == "sgd":
            if self.initial_lr < SGD_MIN_SENSIBLE_LR:  # e.g. an Adam config's 1e-4 kept after switching to SGD
                self.print_to_log_file(f"WARNING: {key} is 'sgd' with nnunet.initial_lr {self.initial_lr:g}, far below "
                                       f"nnU-Net's SGD default of 1e-2 (an Adam learning rate?): training will barely "
                                       f"move; set nnunet.initial_lr with the optimizer", also_print_to_console=True)
            return super().configure_optimizers()
        if name != "adam":
            raise ValueError(f"{key} must be 'adam' or 'sgd', got {name!r}")
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def loss_for_backward(self, total: torch.Tensor) -> torch.Tensor:
        """The total loss, plus ``0 * sum(p)`` over every trainable parameter when training with DDP.

        nnU-Net wraps the network in ``DistributedDataParallel`` with ``find_unused_parameters=False``: every
        parameter must receive a gradient in every backward pass, or the next step fails ("Expected to have
        finished reduction in the prior iteration"). Ablations that switch a term off, and batches in which a
        term has nothing to compare, leave some parameters without one. The zero-weighted sum gives each of
        them an exact zero gradient (what DDP itself all-reduces for unused parameters), whatever a loss
        function skips. ``find_unused_parameters=True`` was not chosen: it would need nnU-Net's wrapping
        replaced, costs a graph traversal every step, and breaks modules that a loss calls outside the
        DDP-wrapped forward (D²-Net's KD projections): DDP marks them unused after the forward and then sees
        their gradients arrive in the backward. Without DDP nothing is added, so an unused parameter keeps
        ``grad=None`` and tests can see it.
        """
        if not self.is_ddp:
            return total
        anchor = sum(p.sum() for p in self.network.parameters() if p.requires_grad)
        return total + 0.0 * anchor

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            losses = self.compute_losses(data, target)
        total = self.loss_for_backward(losses["total"])
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return self.check_finite_losses({"loss": losses["total"].detach().cpu().numpy(),
                                         **{f"loss_{k}": losses[k].detach().cpu().numpy() for k in self.loss_terms}})

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        self.log_loss_terms(self.loss_terms, train_outputs)
