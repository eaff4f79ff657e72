"""reprotune: a reproducible DVC pipeline that fine-tunes a pretrained ResNet18 on CIFAR-10."""

__version__ = "0.1.0"
