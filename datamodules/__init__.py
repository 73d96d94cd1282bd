"""LightningDataModules of lit_divnorm: CIFAR-10/100, Penn Treebank, super-resolution sets."""

from datamodules.cifar import CIFAR10DataModule as CIFAR10DataModule
from datamodules.cifar import CIFAR100DataModule as CIFAR100DataModule
from datamodules.cifar import CifarDataModule as CifarDataModule
from datamodules.ptb import PennTreebankDataModule as PennTreebankDataModule
from datamodules.super_resolution import SuperResolutionDataModule as SuperResolutionDataModule
