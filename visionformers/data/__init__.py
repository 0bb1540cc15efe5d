"""Datasets and transforms: the embedded digits, user image folders, captions, augmentation."""
from visionformers.data.captions import CAPTION_TEMPLATES, DIGIT_NAMES, digit_caption, load_captions
from visionformers.data.digits import DigitsDataset, load_digits
from visionformers.data.image_folder import IMG_EXTENSIONS, ImageFolderDataset
from visionformers.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    classification_eval_transform,
    classification_train_transform,
    diffusion_train_transform,
    mixup_cutmix,
    smooth_one_hot,
)

__all__ = [
    "CAPTION_TEMPLATES", "DIGIT_NAMES", "digit_caption", "load_captions",
    "DigitsDataset", "load_digits",
    "IMG_EXTENSIONS", "ImageFolderDataset",
    "IMAGENET_MEAN", "IMAGENET_STD", "classification_eval_transform", "classification_train_transform",
    "diffusion_train_transform", "mixup_cutmix", "smooth_one_hot",
]
