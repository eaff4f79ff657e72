"""Export: the serving formats (ONNX, int8 ONNX, TorchScript), phone programs (ExecuTorch), the model
card, and structured pruning (the compress stage).
"""
