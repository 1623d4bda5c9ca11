"""Stereo data: file formats, dataset readers, procedural synthetic pairs, training augmentation and the recipe
section that names a dataset (``DatasetSpec``)."""

from compress.data.augment import AugmentConfig, StereoAugmentor, augment
from compress.data.own_footage import OwnFootageFolder  # registers the "own_footage" dataset kind
from compress.data.readers import (
    DATASET_KINDS,
    ETH3DDataset,
    FSDDataset,
    Kitti2012Dataset,
    Kitti2015Dataset,
    MiddleburyDataset,
    SceneFlowDataset,
    StereoPairFolder,
    open_dataset,
)
from compress.data.sample import StereoDataset, StereoSample, sample_to_tensors
from compress.data.spec import DatasetSpec
from compress.data.synthetic import SyntheticConfig, SyntheticStereoDataset, generate_sample, write_synthetic_dataset

__all__ = [
    "DATASET_KINDS",
    "AugmentConfig",
    "DatasetSpec",
    "ETH3DDataset",
    "FSDDataset",
    "Kitti2012Dataset",
    "Kitti2015Dataset",
    "MiddleburyDataset",
    "OwnFootageFolder",
    "SceneFlowDataset",
    "StereoAugmentor",
    "StereoDataset",
    "StereoPairFolder",
    "StereoSample",
    "SyntheticConfig",
    "SyntheticStereoDataset",
    "augment",
    "generate_sample",
    "open_dataset",
    "sample_to_tensors",
    "write_synthetic_dataset",
]
