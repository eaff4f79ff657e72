"""Inference without torch: ONNX Runtime (and ExecuTorch) runners, `reprotune predict`, the Open
Inference Protocol, the Ray Serve server, its request log and Ray's loopback settings. The serving image
has no torch: nothing in this package imports torch or torchvision (checked by import-linter).
"""
