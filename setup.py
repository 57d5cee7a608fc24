"""nnunet_missingmod: nnU-Net v2 extension for brain-tumour segmentation with missing MRI modalities."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="nnunet_missingmod",
    version="0.1.0",
    description="nnU-Net v2 trainers, data tools and evaluation for segmentation with missing MRI modalities",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[*find_packages(include=["nnunet_missingmod", "nnunet_missingmod.*"]),
              "nnunet_missingmod.trainer_configs"],
    # the top-level trainer_configs/ folder ships as the subpackage nnunet_missingmod.trainer_configs
    package_dir={"nnunet_missingmod.trainer_configs": "trainer_configs"},
    package_data={
        "nnunet_missingmod.trainer_configs": ["*.json"],
        # the folder nnUNet_extTrainer points at: only the shim module, deliberately not a package
        "nnunet_missingmod": ["nnunet_ext/*.py"],
    },
    install_requires=[
        "nnunetv2>=2.8.1",
        "torch>=2.1",
        "batchgeneratorsv2>=0.3",
        "dynamic-network-architectures>=0.4",
        "acvl-utils>=0.2",
        "SimpleITK>=2.2",
        "nibabel>=5.0",
        "nilearn>=0.10",  # only for the MNI152 template files bundled in its wheel (read with nibabel)
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-image>=0.19",  # SSIM / PSNR of synthesised images
        "matplotlib>=3.7",
        "tqdm>=4.60",
    ],
    extras_require={"test": ["pytest>=7", "ruff>=0.4", "medpy>=0.5"]},
    entry_points={"console_scripts": ["nnunet_missingmod=nnunet_missingmod.cli:main"]},
)
