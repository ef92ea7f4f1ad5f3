"""compat.lm_kernel_ft against LM-Kernel-FT's kernel computation. LM-Kernel-FT is a
research repository, not a package (it needs functorch and transformers 4.x), so its
published computation is written out here in plain torch.func from its
src/kernel_trainer.py: jacrev over the outer batch, vmap(vmap(jvp)) over the inner batch
(sgd) and the signs' einsum (signgd, asymmetric_signgd); plus a float64 autograd loop of
the definition. The trainer form is bound to a trainer with LM-Kernel-FT's attributes."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap
from torch.utils.data import DataLoader

import tangent_kernels as tk
from tangent_kernels.compat import lm_kernel_ft
from tangent_kernels.compat.lm_kernel_ft import LogitModel
from conftest import rel_err

VOCAB, T, D = 30, 7, 8


class PromptMLM(nn.Module):
    """LM-Kernel-FT's model signature: label-word logits at the <mask> position, returned
    in a tuple; mask_pos squeezed as its models do."""

    def __init__(self, labels=3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.mix = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, mask_pos=None, labels=None):
        h = self.embed(input_ids)
        context = (h * attention_mask.unsqueeze(-1)).sum(1, keepdim=True) / attention_mask.sum(1)[:, None, None]
        h = self.norm(torch.tanh(self.mix(h) + context))
        mask_pos = mask_pos.squeeze()
        return (self.head(h[torch.arange(h.size(0)), mask_pos]),)


def make_dataset(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        mask = torch.ones(T)
        mask[int(torch.randint(4, T + 1, (1,), generator=g)):] = 0
        rows.append({"input_ids": torch.randint(0, VOCAB, (T,), generator=g), "attention_mask": mask,
                     "mask_pos": torch.randint(0, 4, (1,), generator=g), "labels": torch.randint(0, 2, (), generator=g)})
    return rows


def published_kernel(model, outer, inner, formula, binary):
    """LM-Kernel-FT's compute_kernel_outer/inner, in torch.func (from its source)."""
    wrapper = LogitModel(model, binary).eval()
    params = {k: v.detach() for k, v in wrapper.named_parameters()}

    def model_fn(p, batch):
        return functional_call(wrapper, p, (batch["input_ids"], batch["attention_mask"], batch["mask_pos"]))

    rows = []
    for batch_o in outer:
        grads_outer = jacrev(model_fn)(params, batch_o)  # {name: [B_o, C, *shape]}
        if formula == "asymmetric_signgd":
            grads_outer = {k: g.sign() for k, g in grads_outer.items()}
        blocks = []
        for batch_i in inner:
            if formula == "signgd":
                grads_inner = jacrev(model_fn)(params, batch_i)
                block = sum(torch.einsum("olw,ikw->olik", grads_outer[k].sign().flatten(2).double(),
                                         grads_inner[k].sign().flatten(2).double()) for k in params)
            else:
                def ntk_slice(tangents):
                    return jvp(lambda p: model_fn(p, batch_i), (params,), (tangents,))[1]
                block = vmap(vmap(ntk_slice))(grads_outer).double()  # [B_o, C, B_i, C]
            blocks.append(block)
        rows.append(torch.cat(blocks, dim=2))
    return torch.cat(rows, dim=0)


def loop_kernel(model, outer_rows, inner_rows, binary):
    """The definition in float64: K[i, a, j, b] = <d f_a(x_i), d f_b(x_j)>, one sample at a time."""
    wrapper = LogitModel(model, binary).eval()
    params = [p for p in wrapper.parameters()]

    def jac(row):
        out = wrapper(row["input_ids"][None], row["attention_mask"][None], row["mask_pos"][None])[0]
        return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[a], params, retain_graph=True)])
                            for a in range(out.shape[0])])

    jo = torch.stack([jac(r) for r in outer_rows])
    ji = torch.stack([jac(r) for r in inner_rows])
    return torch.einsum("ocp,idp->ocid", jo, ji)


def loader(rows, bs):
    return DataLoader(rows, batch_size=bs)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    return PromptMLM().double(), make_dataset(7, 1), make_dataset(5, 2)


@pytest.mark.parametrize("formula", ["sgd", "signgd", "asymmetric_signgd"])
@pytest.mark.parametrize("binary", [False, True])
def test_the_kernel_is_lm_kernel_ft_s(setup, formula, binary):
    model, train, test = setup
    if binary:
        model.head = nn.Linear(D, 2).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = lm_kernel_ft.compute_kernel(model, loader(train, 3), loader(test, 2), kernel_formula=formula,
                                      binary_classification=binary)
    expected = published_kernel(model, loader(train, 3), loader(test, 2), formula, binary)
    C = 1 if binary else 3
    assert got.shape == expected.shape == (7, C, 5, C) and got.dtype == torch.float64 and got.device.type == "cpu"
    # float64 model: sgd agrees to summation order; the sign kernels count +-1 products
    # exactly, up to a gradient entry within rounding of 0 (none at these sizes)
    assert rel_err(got, expected) <= 1e-12
    if formula == "sgd":
        assert rel_err(got, loop_kernel(model, train, test, binary)) <= 1e-12
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_k_x_x_is_the_symmetric_kernel(setup):
    model, train, _ = setup
    got = lm_kernel_ft.compute_kernel(model, loader(train, 4))
    expected = loop_kernel(model, train, train, False)
    assert rel_err(got, expected) <= 1e-12
    torch.testing.assert_close(got, got.permute(2, 3, 0, 1), rtol=0, atol=0)


def test_float32_models_give_float64_kernels_within_float32_rounding(setup):
    model, train, test = setup
    model32 = PromptMLM()
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    rows32 = [{k: (v.float() if v.is_floating_point() else v) for k, v in r.items()} for r in train]
    got = lm_kernel_ft.compute_kernel(model32, loader(rows32, 4))
    assert got.dtype == torch.float64
    # float32 gradients through four layers, K accumulated in fp32: < 1e-5 relative
    assert rel_err(got, loop_kernel(model, train, train, False)) <= 1e-5
    fp64 = lm_kernel_ft.compute_kernel(model32, loader(rows32, 4), precision="fp64")
    assert rel_err(fp64, loop_kernel(model, train, train, False)) <= 1e-5  # the inputs were rounded to float32


def test_a_parameter_subsample_is_those_columns(setup):
    model, train, test = setup
    idx = tk.subsample(model, 50, seed=3)
    got = lm_kernel_ft.compute_kernel(model, loader(train, 3), loader(test, 5), idx=idx)
    wrapper = LogitModel(model).eval()
    params = [p for p in wrapper.parameters()]

    def jac(row):
        out = wrapper(row["input_ids"][None], row["attention_mask"][None], row["mask_pos"][None])[0]
        return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[a], params, retain_graph=True)])
                            for a in range(3)])[:, idx.positions]

    expected = torch.einsum("ocp,idp->ocid", torch.stack([jac(r) for r in train]), torch.stack([jac(r) for r in test]))
    assert rel_err(got, expected) <= 1e-12


class Trainer:
    """The attributes LM-Kernel-FT's KernelTrainerFunc reads, with our method bound as
    its compute_kernel_sharded (the documented one-line swap)."""

    compute_kernel_sharded = lm_kernel_ft.compute_kernel_sharded

    def __init__(self, model, formula, binary=False):
        self.model, self.grad_dim = model, None
        self.args = SimpleNamespace(kernel_formula=formula, binary_classification=binary, local_rank=-1,
                                    per_device_train_batch_size=3, per_device_eval_batch_size=2)

    def get_unshuffled_dataloader(self, dataset, sharded=False, batch_size=-1):
        return DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size if batch_size == -1 else batch_size)


@pytest.mark.parametrize("binary", [False, True])
def test_the_trainer_method_returns_lm_kernel_ft_s_kernel_and_targets(setup, binary):
    model, train, test = setup
    if binary:
        model.head = nn.Linear(D, 2).double()
    trainer = Trainer(model, "sgd", binary)
    kernel, targets = trainer.compute_kernel_sharded(train, test)
    expected = published_kernel(model, loader(train, 3), loader(test, 2), "sgd", binary)
    assert rel_err(kernel, expected) <= 1e-12
    labels = torch.stack([r["labels"] for r in test])
    torch.testing.assert_close(targets, (labels * 2 - 1).float() if binary else labels)
    assert trainer.grad_dim == sum(p.numel() for p in model.parameters())
    # K(train, train): the same dataset object is the symmetric computation
    kernel, targets = trainer.compute_kernel_sharded(train, train)
    assert rel_err(kernel, loop_kernel(model, train, train, binary)) <= 1e-12 and targets.shape == (7,)


def test_bad_inputs_are_refused_with_the_fix(setup):
    model, train, test = setup
    with pytest.raises(ValueError, match="kernel_formula='adam'"):
        lm_kernel_ft.compute_kernel(model, loader(train, 3), kernel_formula="adam")
    with pytest.raises(ValueError, match="precision='bf16'"):
        lm_kernel_ft.compute_kernel(model, loader(train, 3), precision="bf16")
    with pytest.raises(ValueError, match="binary_classification needs 2 logits"):
        lm_kernel_ft.compute_kernel(model, loader(train, 3), binary_classification=True)
    model.embed.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="param_to_buffer"):
        Trainer(model, "sgd").compute_kernel_sharded(train, test)
