"""Keep genuinely missing modalities missing through nnU-Net's augmentation.

A missing MRI sequence is an all-zero channel in normalised space (nnU-Net's z-score keeps a zero-filled
file at exactly 0). nnU-Net's training transforms do not know that: Gaussian noise (and, in general, any
intensity transform) makes such a channel non-zero, after which it looks "present" to the availability
mask, the losses and the fusion of every trainer of this package. The fix is a pair of transforms:

* :class:`RecordAvailabilityTransform`, first in the pipeline: a modality is acquired when its channel is
  not exactly zero in the sample that the data loader cropped from the preprocessed case; the (M,)
  boolean mask is stored in the sample's dict under :data:`AVAILABILITY_KEY`;
* :class:`ZeroMissingModalitiesTransform`, last (only transforms that zero channels, such as modality
  dropout, may follow it): zeroes the channels that were not acquired, whatever augmentation did to them.

nnU-Net's data loader keeps only ``image`` and ``segmentation`` when it collates a batch, so the mask
does not reach ``train_step``; it does not need to: after the re-zeroing, "channel exactly zero" is again
exactly "not acquired" (:func:`acquired_modalities` on the batch), which is how the trainers read it.

A sample whose crop lies entirely outside the brain has every channel at zero and is recorded as having
no modality; it is zeroed completely at the end (nnU-Net's ``MaskImageTransform`` already sets the
outside of the brain to zero when the plans normalise within the mask, as they do for BraTS).
Availability is taken from the crop, not from the dataset's ``modality_availability.json``: the
transforms see no case identifier, and for a zero-filled sequence both say the same.
"""

from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

#: Key of the (M,) boolean availability mask in a sample's transform dict.
AVAILABILITY_KEY = "modality_availability"


def acquired_modalities(image: torch.Tensor, num_modalities: int | None = None, *, batched: bool = False
                        ) -> torch.Tensor:
    """Boolean mask of modality channels that are not exactly zero.

    Args:
        image: (C, ...) sample, or (B, C, ...) batch with ``batched``.
        num_modalities: number of modality channels at the start of C (default: all of them).
        batched: whether ``image`` has a leading batch dimension.

    Returns:
        (M,) or (B, M) boolean mask.
    """
    channels = image[:, :num_modalities] if batched else image[:num_modalities]
    return channels.flatten(2 if batched else 1).ne(0).any(-1)


class RecordAvailabilityTransform(BasicTransform):
    """Store which modalities a sample has (channel not exactly zero) before any augmentation.

    Put it first in the training transforms. Only the first ``num_modalities`` image channels are
    modalities (a cascade appends one-hot channels later). Image and labels are not changed.

    Args:
        num_modalities: number of modality channels M.

    Example:
        >>> image = torch.ones(4, 8, 8, 8); image[1] = 0
        >>> RecordAvailabilityTransform(num_modalities=4)(image=image)[AVAILABILITY_KEY]
        tensor([ True, False,  True,  True])
    """

    def __init__(self, *, num_modalities: int) -> None:
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be positive, got {num_modalities}")
        self.num_modalities = num_modalities

    def apply(self, data_dict: dict, **params) -> dict:
        image = data_dict["image"]
        if image.shape[0] < self.num_modalities:
            raise ValueError(f"image has {image.shape[0]} channels, fewer than the dataset's "
                             f"{self.num_modalities} modalities (dataset.json channel_names)")
        data_dict[AVAILABILITY_KEY] = acquired_modalities(image, self.num_modalities)
        return data_dict


class ZeroMissingModalitiesTransform(BasicTransform):
    """Zero again the modality channels that :class:`RecordAvailabilityTransform` found missing.

    Put it after all of nnU-Net's transforms. The availability mask stays in the dict for transforms
    that follow (modality dropout reads it); the data loader drops it when it collates the batch.

    Args:
        num_modalities: number of modality channels M (must match the recording transform).
    """

    def __init__(self, *, num_modalities: int) -> None:
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be positive, got {num_modalities}")
        self.num_modalities = num_modalities

    def get_parameters(self, **data_dict) -> dict:
        if AVAILABILITY_KEY not in data_dict:
            raise KeyError(f"no {AVAILABILITY_KEY!r} in the sample: put RecordAvailabilityTransform first in the "
                           "pipeline")
        available = data_dict[AVAILABILITY_KEY]
        if tuple(available.shape) != (self.num_modalities,):
            raise ValueError(f"availability mask of shape {tuple(available.shape)}, expected ({self.num_modalities},)")
        return {"missing": torch.nonzero(~available).flatten().tolist()}

    def apply(self, data_dict: dict, **params) -> dict:
        if params["missing"]:
            data_dict["image"][params["missing"]] = 0
        return data_dict
