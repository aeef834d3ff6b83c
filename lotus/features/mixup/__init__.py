"""Mixup / CutMix (``mixup:``) with timm's ``Mixup``: mixed images and soft targets for the loss."""
