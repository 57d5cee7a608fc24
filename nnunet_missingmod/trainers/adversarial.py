"""AdversarialTrainer: the one base of this package's GAN trainers (UTAD-Net synthesis, CMFT pretraining).

A subclass provides the generator side as nnU-Net's ``self.network`` (built in ``initialize``; nnU-Net's
optimiser, gradient scaler and learning-rate schedule drive it) and the discriminator side through
:meth:`AdversarialTrainer.build_discriminator`, and implements three functions on tensors:

* ``discriminator_losses(data, target) -> {term: tensor, ..., "total": tensor}``: the critic's loss, with the
  generator's outputs detached;
* ``generator_losses(data, target) -> {term: tensor, ..., "total": tensor}``: the generator's loss (the
  discriminator's weights are frozen during this step, so no gradient reaches them);
* ``validation_metrics(data, target) -> {metric: array}``: image-quality metrics replacing nnU-Net's Dice
  pseudo-validation. The first name of ``validation_metric_names`` fills nnU-Net's "pseudo Dice" slot
  (``mean_fg_dice``, so ``checkpoint_best.pth`` is the best by that metric and ``progress.png`` draws it), and
  ``validation_loss_name`` fills ``val_losses``.

One training step (one of nnU-Net's iterations) is ``n_critic`` discriminator updates, then one generator update,
as in WGAN-GP (Gulrajani et al. 2017, Algorithm 1): the first critic update uses the step's batch, every further
one a fresh batch from nnU-Net's training loader, and the generator update the last of them. So
``num_iterations_per_epoch`` counts generator updates, as the papers count iterations.

Config section ``adversarial`` (``trainer_configs/<Trainer>.json``)::

    "adversarial": {
        "n_critic": 1,                           # discriminator updates per generator update
        "generator_optimizer": {"lr": 1e-4, "betas": [0.5, 0.999], "weight_decay": 0.0},
        "discriminator_optimizer": {"lr": 1e-4, "betas": [0.5, 0.999], "weight_decay": 0.0},
        "schedule": {"name": "constant"},        # or "poly" (nnU-Net's), or "constant_then_linear"
                                                 #   with "constant_fraction" and "final_lr"
        "gradient_clip": null,                   # max gradient norm of both updates (null: none)
        "examples_every": 1                      # write the example PNG every N epochs (0: never)
    }

Both optimisers are Adam; the schedule is stepped per epoch for both, like nnU-Net's poly schedule.

Everything a resumed run (``nnUNetv2_train ... --c``) needs is in the checkpoint: nnU-Net's part (generator
weights, its optimiser and gradient scaler, the logger with every loss term and validation metric) and
``missingmod_state`` (the discriminator's weights, its optimiser and gradient scaler). A checkpoint without the
discriminator state is refused on resume rather than silently restarting the critic.

Written next to nnU-Net's ``progress.png``: ``progress_adversarial.png`` (every logged generator and
discriminator term, and the validation metrics, per epoch) and, every ``examples_every`` epochs,
``examples/epoch_XXXX.png`` from :meth:`AdversarialTrainer.write_examples`.

nnU-Net's final validation (sliding-window segmentation of the validation cases and Dice) does not apply to a
generator; ``perform_actual_validation`` calls :meth:`AdversarialTrainer.final_validation` instead.
"""

from __future__ import annotations

import os
from os.path import join

import matplotlib
import numpy as np
import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import _LRScheduler

from nnunet_missingmod.trainers.base import MissingModTrainerBase

#: nnU-Net's intensity augmentations. A GAN trainer may leave them out: noise, blur, brightness, contrast, low
#: resolution and gamma applied to the real images move what the critic learns as "real".
INTENSITY_TRANSFORMS = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform,
                        ContrastTransform, SimulateLowResolutionTransform, GammaTransform)


def without_intensity_augmentation(transforms):
    """nnU-Net's training transforms with its intensity augmentations (:data:`INTENSITY_TRANSFORMS`) removed."""
    transforms.transforms = [t for t in transforms.transforms
                             if not (isinstance(t, RandomTransform) and isinstance(t.transform, INTENSITY_TRANSFORMS))]
    return transforms


class ConstantThenLinearLR(_LRScheduler):
    """Learning rate ``initial_lr`` for the first ``constant_fraction`` of ``max_steps``, then linear to ``final_lr``.

    The schedule of CycleGAN/StarGAN-style training (UTAD-Net: 1e-4 for the first half, then linear decay to
    1e-6). Stepped like nnU-Net's ``PolyLRScheduler``: ``step(current_step)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int,
                 constant_fraction: float = 0.5, final_lr: float = 0.0, current_step: int | None = None):
        if not 0.0 <= constant_fraction <= 1.0:
            raise ValueError(f"constant_fraction must lie in [0, 1], got {constant_fraction}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.final_lr = final_lr
        self.max_steps = max_steps
        self.constant_steps = int(round(constant_fraction * max_steps))
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, step: int) -> float:
        if step < self.constant_steps:
            return self.initial_lr
        decay_steps = max(1, self.max_steps - 1 - self.constant_steps)
        progress = min(1.0, (step - self.constant_steps) / decay_steps)
        return self.initial_lr + (self.final_lr - self.initial_lr) * progress

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr


def make_adam(parameters, settings: dict, where: str) -> torch.optim.Adam:
    """Adam from a config entry ``{"lr", "betas", "weight_decay"}``; bad values name ``where``."""
    unknown = set(settings) - {"lr", "betas", "weight_decay"}
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {sorted(unknown)}; valid: lr, betas, weight_decay")
    lr = settings.get("lr", 1e-4)
    betas = tuple(settings.get("betas", (0.5, 0.999)))
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"{where}.lr must be a positive number, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{where}.betas must be two numbers in [0, 1), got {list(betas)}")
    return torch.optim.Adam(parameters, lr=lr, betas=betas, weight_decay=settings.get("weight_decay", 0.0))


def make_schedule(optimizer: torch.optim.Optimizer, settings: dict, num_epochs: int) -> _LRScheduler:
    """The per-epoch schedule named by the config entry ``schedule``."""
    name = settings.get("name", "constant")
    initial_lr = optimizer.param_groups[0]["lr"]
    if name == "constant":
        return ConstantThenLinearLR(optimizer, initial_lr, num_epochs, constant_fraction=1.0, final_lr=initial_lr)
    if name == "poly":
        return PolyLRScheduler(optimizer, initial_lr, num_epochs)
    if name == "constant_then_linear":
        return ConstantThenLinearLR(optimizer, initial_lr, num_epochs,
                                    constant_fraction=settings.get("constant_fraction", 0.5),
                                    final_lr=settings.get("final_lr", 0.0))
    raise ValueError(f"adversarial.schedule.name must be constant, poly or constant_then_linear, got {name!r}")


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


class AdversarialTrainer(MissingModTrainerBase):
    """nnU-Net trainer for a generator (``self.network``) against a discriminator (``self.discriminator``).

    Subclasses set ``generator_terms``, ``discriminator_terms`` (logged as ``loss_<name>``),
    ``validation_metric_names`` and ``validation_loss_name``, and implement :meth:`build_discriminator`,
    :meth:`discriminator_losses`, :meth:`generator_losses` and :meth:`validation_metrics`.
    """

    generator_terms: tuple[str, ...] = ()
    discriminator_terms: tuple[str, ...] = ()
    validation_metric_names: tuple[str, ...] = ()
    validation_loss_name: str = ""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = self.trainer_config["adversarial"]
        n_critic = settings.get("n_critic", 1)
        if not (isinstance(n_critic, int) and not isinstance(n_critic, bool) and n_critic >= 1):
            raise ValueError(f"{type(self).__name__}: adversarial.n_critic must be an integer >= 1, got {n_critic!r}")
        self.n_critic = n_critic
        clip = settings.get("gradient_clip")
        if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
            raise ValueError(f"{type(self).__name__}: adversarial.gradient_clip must be null or > 0, got {clip!r}")
        self.gradient_clip = clip
        self.examples_every = int(settings.get("examples_every", 1))
        self.enable_deep_supervision = False  # generators output images, not segmentation pyramids
        self.discriminator: nn.Module | None = None
        self.batch_keys = None  # case identifiers of the batch being processed (set by _to_device)
        self.optimizer_d: torch.optim.Optimizer | None = None
        self.lr_scheduler_d: _LRScheduler | None = None
        self.grad_scaler_d = torch.amp.GradScaler("cuda") if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ to implement
    def build_discriminator(self) -> nn.Module:
        raise NotImplementedError

    def discriminator_losses(self, data: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def generator_losses(self, data: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def validation_metrics(self, data: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def write_examples(self, filename: str) -> None:
        """Write a PNG of example inputs and outputs for the current weights (default: nothing)."""

    def final_validation(self) -> None:
        """Validation after training in place of nnU-Net's segmentation of the validation cases (default: none)."""
        self.print_to_log_file(f"{type(self).__name__}: no final validation (the validation metrics of every epoch "
                               f"are in the training log and progress_adversarial.png)")

    # ------------------------------------------------------------------ set-up
    @property
    def loss_terms(self) -> tuple[str, ...]:
        return tuple(self.generator_terms) + tuple(self.discriminator_terms)

    @property
    def discriminator_module(self) -> nn.Module:
        """The discriminator without its DDP wrapper."""
        return self.discriminator.module if isinstance(self.discriminator, DDP) else self.discriminator

    @property
    def generator_module(self) -> nn.Module:
        """``self.network`` without its DDP / compile wrappers."""
        module = self.network.module if self.is_ddp else self.network
        return module._orig_mod if isinstance(module, OptimizedModule) else module

    def initialize(self) -> None:
        super().initialize()
        self.discriminator = self.build_discriminator().to(self.device)
        if self.is_ddp:
            self.discriminator = DDP(nn.SyncBatchNorm.convert_sync_batchnorm(self.discriminator),
                                     device_ids=[self.local_rank])
        settings = self.trainer_config["adversarial"]
        self.optimizer_d = make_adam(self.discriminator.parameters(), settings.get("discriminator_optimizer", {}),
                                     "adversarial.discriminator_optimizer")
        self.lr_scheduler_d = make_schedule(self.optimizer_d, settings.get("schedule", {}), self.num_epochs)

    def configure_optimizers(self):
        settings = self.trainer_config["adversarial"]
        optimizer = make_adam(self.network.parameters(), settings.get("generator_optimizer", {}),
                              "adversarial.generator_optimizer")
        return optimizer, make_schedule(optimizer, settings.get("schedule", {}), self.num_epochs)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """Generators have no deep-supervision outputs; nnU-Net's default would look for ``network.decoder``."""

    def _do_i_compile(self) -> bool:
        return False  # two networks stepped alternately, with frozen weights in between: left to eager mode

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.discriminator.train()
        self.lr_scheduler_d.step(self.current_epoch)
        self.logger.local_logger.my_fantastic_logging.setdefault("lrs_discriminator", [])
        self.logger.log("lrs_discriminator", self.optimizer_d.param_groups[0]["lr"], self.current_epoch)

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's data and target on the device; its case identifiers (nnU-Net's ``keys``, or None) are kept
        in ``self.batch_keys`` for the loss functions, which receive tensors only."""
        self.batch_keys = batch.get("keys")
        target = batch["target"]
        if isinstance(target, list):
            target = target[0]
        return batch["data"].to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _step(self, total: torch.Tensor, optimizer: torch.optim.Optimizer, scaler, parameters) -> None:
        parameters = list(parameters)
        if self.is_ddp:  # every parameter must take part in the backward pass (see MultiTermLossTrainer)
            total = total + 0.0 * sum(p.sum() for p in parameters if p.requires_grad)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
            if self.gradient_clip:
                torch.nn.utils.clip_grad_norm_(parameters, self.gradient_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            if self.gradient_clip:
                torch.nn.utils.clip_grad_norm_(parameters, self.gradient_clip)
            optimizer.step()

    def train_step(self, batch: dict) -> dict:
        d_outputs = []
        for critic_step in range(self.n_critic):
            if critic_step > 0:
                batch = next(self.dataloader_train)
            data, target = self._to_device(batch)
            self.optimizer_d.zero_grad(set_to_none=True)
            with self._autocast():
                losses = self.discriminator_losses(data, target)
            self._step(losses["total"], self.optimizer_d, self.grad_scaler_d, self.discriminator.parameters())
            d_outputs.append({k: float(losses[k].detach().cpu()) for k in self.discriminator_terms})
        set_requires_grad(self.discriminator, False)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                losses = self.generator_losses(data, target)
            self._step(losses["total"], self.optimizer, self.grad_scaler, self.network.parameters())
        finally:
            set_requires_grad(self.discriminator, True)
        outputs = {"loss": losses["total"].detach().cpu().numpy(),
                   **{f"loss_{k}": losses[k].detach().cpu().numpy() for k in self.generator_terms},
                   **{f"loss_{k}": np.mean([o[k] for o in d_outputs]) for k in self.discriminator_terms}}
        return self.check_finite_losses(outputs)

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        self.log_loss_terms(self.loss_terms, train_outputs)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.discriminator.eval()

    def validation_step(self, batch: dict) -> dict:
        data, target = self._to_device(batch)
        with self._autocast():
            metrics = self.validation_metrics(data, target)
        return {k: np.asarray(v, dtype=np.float64) for k, v in metrics.items()}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        collated = collate_outputs(val_outputs)
        means = {}
        for name in self.validation_metric_names:
            values = np.asarray(collated[name], dtype=np.float64).ravel()
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, values)
                values = np.concatenate(gathered)
            means[name] = float(np.nanmean(values)) if values.size else float("nan")
        history = self.logger.local_logger.my_fantastic_logging
        for name, value in means.items():
            history.setdefault(f"val_{name}", [])
            self.logger.log(f"val_{name}", value, self.current_epoch)
        score = means[self.validation_metric_names[0]]
        self.logger.log("mean_fg_dice", score, self.current_epoch)
        self.logger.log("dice_per_class_or_region", [score], self.current_epoch)
        self.logger.log("val_losses", means[self.validation_loss_name], self.current_epoch)
        self.print_to_log_file("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()) +
                               f" (nnU-Net's 'pseudo dice' below is {self.validation_metric_names[0]}, its "
                               f"val_loss {self.validation_loss_name})")

    def on_epoch_end(self) -> None:
        if self.local_rank == 0:
            plot_adversarial_progress(self.logger.local_logger.my_fantastic_logging, self.generator_terms,
                                      self.discriminator_terms, self.validation_metric_names,
                                      join(self.output_folder, "progress_adversarial.png"))
            if self.examples_every and self.current_epoch % self.examples_every == 0:
                folder = join(self.output_folder, "examples")
                os.makedirs(folder, exist_ok=True)
                self.network.eval()
                with torch.no_grad():
                    self.write_examples(join(folder, f"epoch_{self.current_epoch:04d}.png"))
        super().on_epoch_end()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.network.eval()
        with torch.no_grad():
            self.final_validation()

    # ------------------------------------------------------------------ checkpoint
    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"discriminator": self.discriminator_module} if self.discriminator is not None else {}

    def extra_checkpoint_state(self) -> dict:
        return {"discriminator_weights": self.discriminator_module.state_dict(),
                "discriminator_optimizer_state": self.optimizer_d.state_dict(),
                "discriminator_grad_scaler_state":
                    self.grad_scaler_d.state_dict() if self.grad_scaler_d is not None else None}

    def load_extra_checkpoint_state(self, state: dict | None, filename: str) -> None:
        if not state or "discriminator_weights" not in state:
            raise ValueError(f"{filename} has no discriminator state: it was not written by {type(self).__name__} "
                             f"(or by an older version); a GAN trainer cannot resume without its discriminator")
        try:
            self.discriminator_module.load_state_dict(state["discriminator_weights"])
        except RuntimeError as error:
            raise ValueError(f"{filename}: the discriminator weights do not fit {type(self).__name__}'s "
                             f"discriminator (different plans or config?): {error}") from None
        self.optimizer_d.load_state_dict(state["discriminator_optimizer_state"])
        if self.grad_scaler_d is not None and state.get("discriminator_grad_scaler_state") is not None:
            self.grad_scaler_d.load_state_dict(state["discriminator_grad_scaler_state"])


def plot_adversarial_progress(history: dict, generator_terms, discriminator_terms, metric_names,
                              filename: str) -> None:
    """Generator terms, discriminator terms and validation metrics per epoch, side by side, in ``filename``.

    Validation metrics in decibels (PSNR) go on a second axis, so that SSIM and L1 keep their own scale.
    """
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    panels = [("generator terms (unweighted)", [f"loss_{t}" for t in generator_terms]),
              ("discriminator terms (unweighted)", [f"loss_{t}" for t in discriminator_terms]),
              ("validation", [f"val_{m}" for m in metric_names])]
    sizes = {"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 8}
    with plt.style.context("default"), plt.rc_context(sizes):  # nnU-Net leaves seaborn at font_scale 2.5
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for ax, (title, keys) in zip(axes, panels, strict=False):
            decibels = ax.twinx() if any(k.endswith("psnr") for k in keys) else None
            lines = []
            for index, key in enumerate(keys):
                values = np.asarray(history.get(key, []), dtype=float)
                if values.size:
                    axis = decibels if decibels is not None and key.endswith("psnr") else ax
                    lines += axis.plot(np.arange(values.size), values, label=key.split("_", 1)[1], linewidth=2,
                                       color=f"C{index}")
            ax.set(title=title, xlabel="epoch")
            if decibels is not None:
                decibels.set_ylabel("PSNR (dB)")
            if lines:
                ax.legend(lines, [line.get_label() for line in lines], loc="best", ncol=2)
        fig.tight_layout()
        fig.savefig(filename, dpi=90)
        plt.close(fig)
