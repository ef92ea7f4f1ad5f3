"""tk.Kernel keeps the features of the loaders it evaluated last: a cross kernel right after
a Gram reuses that side, exactly; any change of the weights (in place, through .data,
load_state_dict, buffers), of the loader's data or of the computation makes it compute
the side again; the memory kept stays under max_memory."""

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from tangent_kernels.reference import gram_autograd

TOL = {"fp32": 2e-5, "fp64": 1e-11}


def close(k, reference, precision):
    scale = reference.abs().max().item()
    assert k.shape == reference.shape
    assert (k.double() - reference).abs().max().item() <= TOL[precision] * scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(6, 16), nn.Linear(16, 3)
        self.register_buffer("scale", torch.ones(6))
        self.temperature = 1.0

    def forward(self, x):
        return self.head(torch.tanh(self.body(x * self.scale))) / self.temperature


def loaders(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 6, generator=g), torch.randn(7, 6, generator=g)], [torch.randn(4, 6, generator=g)]


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
@pytest.mark.parametrize("structured", ["auto", "never", "always"])
def test_cross_after_gram_reuses_the_train_side_exactly(precision, structured):
    model = Net()
    train, test = loaders()
    kernel = tk.Kernel(model, output="sum", precision=precision, structured=structured)
    close(kernel.gram(train, progress=False), gram_autograd(model, train, output="sum"), precision)
    assert kernel.kept.hits == 0
    close(kernel.cross(test, train, progress=False), gram_autograd(model, test, loader2=train, output="sum"),
          precision)
    assert kernel.kept.hits == 1  # the train side was not computed again
    close(kernel.cross(train, test, progress=False), gram_autograd(model, train, loader2=test, output="sum"),
          precision)
    assert kernel.kept.hits == 3  # both sides kept by now
    close(kernel.gram(train, progress=False), gram_autograd(model, train, output="sum"), precision)
    assert kernel.kept.hits == 4


def sgd_step(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()
    opt.step()


def data_write(model, x):
    with torch.no_grad():
        model.body.weight.data.mul_(1.5)  # moves no version counter


def load_state(model, x):
    other = Net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    model.load_state_dict(other.state_dict())


def buffer_update(model, x):
    model.scale.mul_(2.0)


def buffer_replaced(model, x):
    model.scale = torch.full((6,), 0.5)


def attribute_changed(model, x):
    model.temperature = 2.0


@pytest.mark.parametrize("change", [sgd_step, data_write, load_state, buffer_update, buffer_replaced,
                                    attribute_changed])
def test_a_change_of_the_model_computes_the_side_again(change):
    model = Net()
    train, test = loaders()
    kernel = tk.Kernel(model, output="sum", precision="fp64")
    kernel.gram(train, progress=False)
    change(model, train[0])
    close(kernel.cross(test, train, progress=False), gram_autograd(model, test, loader2=train, output="sum"), "fp64")
    assert kernel.kept.hits == 0


def in_place(train):
    train[1].mul_(2.0)


def through_data(train):
    train[1].data[0, 0] += 1.0  # moves no version counter


def batch_replaced(train):
    train[0] = train[0] + 1.0


def batch_added(train):
    train.append(torch.randn(3, 6))


@pytest.mark.parametrize("change", [in_place, through_data, batch_replaced, batch_added])
def test_a_change_of_the_loaders_data_computes_the_side_again(change):
    model = Net()
    train, test = loaders()
    kernel = tk.Kernel(model, output="sum", precision="fp64")
    kernel.gram(train, progress=False)
    change(train)
    close(kernel.cross(test, train, progress=False), gram_autograd(model, test, loader2=train, output="sum"), "fp64")
    assert kernel.kept.hits == 0


def test_another_loader_object_with_the_same_data_is_not_taken_for_the_kept_one():
    model = Net()
    train, test = loaders()
    kernel = tk.Kernel(model, output="sum", precision="fp64")
    kernel.gram(train, progress=False)
    kernel.cross(test, list(train), progress=False)
    assert kernel.kept.hits == 0


def test_the_memory_kept_stays_under_max_memory_and_clear_or_keep_false_drop_it():
    model = Net()
    train, test = loaders()
    small = tk.Kernel(model, output="sum", max_memory=1000)  # less than the weights' copy: nothing is kept
    small.gram(train, progress=False)
    small.cross(test, train, progress=False)
    assert small.kept.nbytes <= 1000 and small.kept.hits == 0
    roomy = tk.Kernel(model, output="sum")
    roomy.gram(train, progress=False)
    one_side = roomy.kept.nbytes
    assert one_side > 0
    bounded = tk.Kernel(model, output="sum", max_memory=one_side)  # room for one side only
    bounded.gram(train, progress=False)
    bounded.gram(test, progress=False)  # the older side makes room for this one
    assert bounded.kept.nbytes <= one_side
    bounded.cross(test, train, progress=False)
    assert bounded.kept.nbytes <= one_side
    roomy.clear()
    assert roomy.kept.nbytes == 0
    off = tk.Kernel(model, output="sum", keep=False)
    off.gram(train, progress=False)
    off.cross(test, train, progress=False)
    assert off.kept.nbytes == 0 and off.kept.hits == 0
    with pytest.raises(ValueError, match="max_memory"):
        tk.Kernel(model, max_memory=-1)


def test_a_structure_change_drops_the_kept_sides():
    model = Net()
    train, test = loaders()
    kernel = tk.Kernel(model, output="sum", precision="fp64")
    kernel.gram(train, progress=False)
    model.head = nn.Linear(16, 3)
    close(kernel.cross(test, train, progress=False), gram_autograd(model, test, loader2=train, output="sum"), "fp64")
    assert kernel.kept.hits == 0


def test_buffers_of_dropped_sides_are_reused_by_the_next_call_without_their_values():
    # After a step the kept sides are stale: their memory is handed to the stores of the
    # next call (same shapes), which must hold that call's features only.
    model = Net()
    train, test = loaders()
    other = [t.flip(0) * 2.0 for t in train]
    kernel = tk.Kernel(model, output="sum", precision="fp64", structured="never")
    kernel.gram(train, progress=False)
    for loader in (other, train, other):
        sgd_step(model, train[0])
        close(kernel.gram(loader, progress=False), gram_autograd(model, loader, output="sum"), "fp64")
        close(kernel.cross(test, loader, progress=False), gram_autograd(model, test, loader2=loader, output="sum"),
              "fp64")
    assert kernel.kept.recycled == []  # nothing left over between calls
