"""From a trained model to a deployed one (`python -m lowrank_dist.export`):

- fold.py: BatchNorm folded into the conv or linear layer before it, exactly (float64 arithmetic);
- forms.py: the inference model — every low-rank layer in its inference form (two thin convs,
  the same with the rank padded to whole channel blocks, or one conv of the precomputed composed
  kernel), BatchNorm folded, dropout and auxiliary heads gone;
- runtimes.py: ONNX and torch.export (.pt2) files of it, and the runtimes that run them (torch
  eager, onnxruntime's CPU, CUDA and TensorRT providers), each a callable on a batch.

Which form each layer takes is measured, per runtime and batch, by speed.inference."""
