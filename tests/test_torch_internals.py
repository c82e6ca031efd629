"""The private torch functions the project relies on (runtime.flag_non_finite, runtime.storage_holders)
still behave as it assumes: a torch release that changes one fails here, by name, not somewhere deep
in a training run."""

import math

import torch

from lowrank_dist.runtime import flag_non_finite, storage_holders


def test_flag_non_finite_sets_the_flag_for_inf_or_nan_and_leaves_the_tensors_alone():
    finite = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    kept = [t.clone() for t in finite]
    found = torch.zeros(())
    flag_non_finite(finite, found)
    assert found.item() == 0.0 and all(torch.equal(a, b) for a, b in zip(finite, kept))
    for bad in (math.inf, -math.inf, math.nan):
        tensors = [torch.tensor([1.0]), torch.tensor([2.0, bad])]
        found = torch.zeros(())
        flag_non_finite(tensors, found)
        assert found.item() == 1.0, bad
        assert tensors[0].item() == 1.0 and tensors[1][0].item() == 2.0  # multiplied by a scale of 1
    found = torch.ones(())
    flag_non_finite(finite, found)
    assert found.item() == 1.0  # never cleared: a flag set earlier (GradScaler's) is kept


def test_storage_holders_counts_every_tensor_and_view_sharing_the_storage():
    buffer = torch.empty(4, 3)
    alone = storage_holders(buffer)
    assert alone == 2  # the buffer, and the temporary storage object of the call
    view = buffer[1:]
    assert storage_holders(buffer) == alone + 1
    other_view = view.t()
    assert storage_holders(buffer) == alone + 2
    del view, other_view
    assert storage_holders(buffer) == alone
    assert storage_holders(torch.empty(2)) == 2  # another tensor's storage is not counted
