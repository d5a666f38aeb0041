"""The pipeline's interface check walks outputs in the engines' one order (`quality.output_leaves`)."""

from __future__ import annotations

import pytest
import torch

from worker.engines.errors import EngineError
from worker.runner import _check_interface


def test_a_dict_built_in_another_order_keeps_the_interface():
    logits, features = torch.zeros(2, 3), torch.zeros(2, 5)
    _check_interface({"logits": logits, "features": features}, {"features": features, "logits": logits}, "quantize")


@pytest.mark.parametrize(
    "changed",
    [
        [torch.zeros(2, 3), torch.zeros(2)],  # a tuple become a list
        (torch.zeros(2, 3), torch.zeros(2, dtype=torch.float16)),
        (torch.zeros(2, 4), torch.zeros(2)),
    ],
)
def test_a_changed_structure_dtype_or_shape_is_refused(changed):
    with pytest.raises(EngineError) as caught:
        _check_interface((torch.zeros(2, 3), torch.zeros(2)), changed, "quantize")
    assert caught.value.code == "interface_changed" and "tuple[1]" in caught.value.message
