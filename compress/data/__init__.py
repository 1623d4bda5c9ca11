"""Stereo data: file formats, dataset readers, procedural synthetic pairs and training augmentation."""

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
    StereoDataset,
    StereoPairFolder,
    StereoSample,
    open_dataset,
    sample_to_tensors,
)
from compress.data.synthetic import SyntheticConfig, SyntheticStereoDataset, generate_sample, write_synthetic_dataset

__all__ = [
    "DATASET_KINDS",
    "AugmentConfig",
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
