"""Bad input to gram()/features(): the error names the problem and the fix."""

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from _models import cnn, cnn_input, mlp


def gram(model, loader, *args, **kwargs):
    return tk.gram(model, loader, *args, progress=False, **kwargs)


@pytest.mark.parametrize(
    "loader",
    [[], iter([]), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 6)), batch_size=4)],
    ids=["list", "iterator", "dataloader"],
)
def test_empty_loader(loader):
    with pytest.raises(ValueError, match="loader yielded no samples"):
        gram(mlp(), loader)


def test_empty_loader2():
    with pytest.raises(ValueError, match="loader2 yielded no samples"):
        gram(mlp(), [torch.randn(2, 6)], None, [])


def test_loader_not_iterable():
    with pytest.raises(TypeError, match="loader must be iterable.*got int"):
        gram(mlp(), 3)


def test_unreadable_batch_type():
    with pytest.raises(TypeError, match="batch of type str.*inputs=callable"):
        gram(mlp(), ["not a tensor"])


class Returns(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.make = make

    def forward(self, x):
        return self.make(self.lin(x))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda h: h.unsqueeze(1).expand(-1, 3, -1), r"output has shape \(\d+, 3, 4\).*output=callable"),
        (lambda h: h.sum(), r"output has shape \(\).*\[B, k\] or \[B\]"),
        (lambda h: (h, h), r"returned a tuple.*'logits'"),
        (lambda h: {"hidden": h}, r"returned a dict.*'logits'"),
    ],
    ids=["sequence", "scalar", "tuple", "dict-without-logits"],
)
def test_unsupported_model_output(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        gram(Returns(make), [torch.randn(3, 6)])


def test_output_index_out_of_range():
    with pytest.raises(ValueError, match=r"output=7 is out of range.*k=3.*0 \.\. 2"):
        gram(mlp(k=3), [torch.randn(3, 6)], output=7)


@pytest.mark.parametrize("output, error", [("mean", ValueError), (1.5, TypeError), (True, TypeError)])
def test_unknown_output_spec(output, error):
    with pytest.raises(error, match="output.*'first'.*'sum'.*int.*callable"):
        gram(mlp(), [torch.randn(3, 6)], output=output)


def test_output_callable_with_wrong_shape():
    with pytest.raises(ValueError, match=r"callable must return one scalar per sample, a tensor of shape \[B\]"):
        gram(mlp(), [torch.randn(3, 6)], output=lambda out: out)


def test_non_finite_gradient_names_the_sample():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    x = torch.randn(7, 3)
    x[5, 1] = float("nan")  # the 6th sample (position 5), in the second batch
    with pytest.raises(ValueError, match=r"non-finite gradient.*position 5 of loader"):
        gram(model, [x[:4], x[4:]])
    with pytest.raises(ValueError, match=r"position 1 of loader2"):
        gram(model, [x[:4]], None, [x[4:]])


def test_finite_gradients_whose_row_sums_overflow_are_accepted():
    """The finiteness check sums rows first; an overflowing sum of finite values must
    not be reported as a non-finite gradient."""
    from tangent_kernels.feature_phase import check_finite

    big = torch.full((3, 8), 3e38)
    check_finite(big, 0, "loader")
    big[2, 5] = -float("inf")
    with pytest.raises(ValueError, match=r"position 12 of loader"):
        check_finite(big, 10, "loader")


def test_loader2_with_different_structure():
    model = cnn()
    a = cnn_input(3)
    with pytest.raises(ValueError, match=r"loader2 \(the second loader of a cross kernel.*arg 0: 3x12x12 float32"
                                         r".*arg 0: 3x10x10 float32"):
        gram(model, [a], None, [torch.randn(2, 3, 10, 10)])
    with pytest.raises(ValueError, match=r"loader2 \(the second loader.*input: 3x12x12 float32"):
        gram(model, [a], None, [{"input": cnn_input(2)}])


@pytest.mark.parametrize("precision", ["fp8", "float32", "BF16"])
def test_unknown_precision(precision):
    with pytest.raises(ValueError, match=r"unknown precision.*available: fp64, fp32, tf32, bf16, fp16"):
        gram(mlp(), [torch.randn(2, 6)], precision=precision)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gram(lambda x: x, [torch.randn(2, 6)])


def test_unknown_or_missing_device_is_named():
    with pytest.raises(ValueError, match="device: 'banana' is not a device; use cpu, cuda or cuda:N"):
        gram(mlp(), [torch.randn(2, 6)], device="banana")
    # a CUDA device this machine does not have: none at all here, or an index past the count
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=f"device {missing}: "):
        gram(mlp(), [torch.randn(2, 6)], device=missing)
    with pytest.raises(ValueError, match=f"device {missing}: "):
        tk.KernelRidge(device=missing)
