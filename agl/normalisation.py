"""ImageNet channel statistics: the one definition the loaders, the feature cache and the encoders share.

A leaf module (no imports) so that light modules (the backbone registry) can use the
numbers without importing the data package.
"""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
