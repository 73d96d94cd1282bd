"""LightningDataModules of lit_divnorm: CIFAR-10/100, Penn Treebank, super-resolution sets."""

from datamodules.super_resolution import SuperResolutionDataModule as SuperResolutionDataModule
