"""Datasets and their on-disk formats, splits, augmentation and loaders.

    from ktg_fast.data import load_dataset, train_val_split, make_loader
    train, val = train_val_split(load_dataset("cifar100"), 10_000, seed=0)
    loader, kind, why = make_loader("auto", train, 64, train=True, seed=0, device="cuda")
    for x, y in loader: ...
"""
from .augment import random_crop_flip, reflect_pad
from .dali import DaliLoader, DaliUnavailableError, dali_status
from .dataset import ArrayDataset, DatasetNotFoundError, ImageFolder
from .factory import LOADER_KINDS, choose_loader, make_loader
from .loader import BatchLoader
from .plan import CropFlip, EpochLoader, EpochPlan, make_epoch_plan
from .registry import (available_datasets, canonical_name, dataset_info, default_root,
                       load_dataset, load_image_folder)
from .spec import SPLIT_SEED, DataSpec
from .splits import default_val_size, train_val_split
from .synthetic import make_synthetic

__all__ = [
    "DataSpec",
    "SPLIT_SEED",
    "ArrayDataset",
    "BatchLoader",
    "DaliLoader",
    "DaliUnavailableError",
    "LOADER_KINDS",
    "choose_loader",
    "dali_status",
    "make_loader",
    "CropFlip",
    "DatasetNotFoundError",
    "EpochLoader",
    "EpochPlan",
    "ImageFolder",
    "available_datasets",
    "canonical_name",
    "dataset_info",
    "default_root",
    "default_val_size",
    "load_dataset",
    "load_image_folder",
    "make_epoch_plan",
    "make_synthetic",
    "random_crop_flip",
    "reflect_pad",
    "train_val_split",
]
