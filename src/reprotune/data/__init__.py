"""The data: fetch or synthesize an archive, read CIFAR archives and image folders without trusting
them, split, and cache uint8 tensors. Torch only for the cached tensors; nothing here trains.
"""
