"""tk.tracking: the kernel distance against its formula, the tracker's records against
the statistics of K computed directly at the same steps."""

import numpy as np
import pytest
import torch
from torch import nn

import tangent_kernels as tk
from tangent_kernels.reference import gram_autograd
from conftest import psd


def test_kernel_distance_formula_and_invariances():
    K1, K2 = psd(9, 4, 0), psd(9, 6, 1)
    expected = 1 - float((K1 * K2).sum()) / (float(K1.norm()) * float(K2.norm()))
    assert tk.tracking.kernel_distance(K1, K2) == pytest.approx(expected, rel=1e-12)
    assert tk.tracking.kernel_distance(K1, 3.5 * K1) == pytest.approx(0.0, abs=1e-12)  # scale-free
    assert tk.tracking.kernel_distance(K1.numpy(), K2.float()) == pytest.approx(expected, rel=1e-6)
    e = torch.zeros(2, 2, dtype=torch.float64)
    a, b = e.clone(), e.clone()
    a[0, 0], b[1, 1] = 1.0, 1.0
    assert tk.tracking.kernel_distance(a, b) == pytest.approx(1.0)  # orthogonal


def test_kernel_distance_refuses_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        tk.tracking.kernel_distance(psd(3, 2, 0), psd(4, 2, 0))
    with pytest.raises(ValueError, match="K2 is zero"):
        tk.tracking.kernel_distance(psd(3, 2, 0), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="inf or nan"):
        tk.tracking.kernel_distance(torch.full((2, 2), float("nan")), psd(2, 2, 0))
    with pytest.raises(TypeError, match="floating-point"):
        tk.tracking.kernel_distance(torch.ones(2, 2, dtype=torch.int64), psd(2, 2, 0))


def test_summarize_a_sequence():
    kernels = [psd(8, 3, s) for s in range(3)]
    y = torch.tensor([0, 1, 0, 1, 2, 2, 1, 0])
    records = tk.tracking.summarize(kernels, y, top=2, steps=[0, 10, 20])
    assert [r.step for r in records] == [0, 10, 20]
    for K, r in zip(kernels, records):
        eig = np.sort(np.linalg.eigvalsh(K.numpy()))[::-1]
        assert np.allclose(r.top_eigenvalues.numpy(), eig[:2], rtol=1e-9)
        assert r.alignment == pytest.approx(tk.analysis.alignment(K, y), rel=1e-12)
        assert r.distance == pytest.approx(tk.tracking.kernel_distance(kernels[0], K), abs=1e-12)
    assert records[0].distance == pytest.approx(0.0, abs=1e-12)


def test_tracker_records_every_n_steps_in_a_training_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    probe = torch.randn(6, 5)
    tracker = tk.tracking.KernelTracker(model, [probe], every=3, targets=y[:6], top=3, output="sum",
                                        precision="fp64", keep_kernels=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = {}
    for step in range(7):
        if step % 3 == 0:
            expected[step] = gram_autograd(model, [probe], output="sum")
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        # the tracker's K is taken before this step's update, like expected's
        tracker.step()
        optimizer.step()
    history = tracker.history()
    assert history["step"] == [0, 3, 6]
    assert history["top_eigenvalues"].shape == (3, 3)
    for record in tracker.records:
        reference = expected[record.step]
        assert torch.allclose(record.kernel.double(), reference, rtol=1e-9, atol=1e-12)
        assert record.distance == pytest.approx(tk.tracking.kernel_distance(expected[0], reference), abs=1e-9)
        assert record.alignment == pytest.approx(tk.analysis.alignment(reference, y[:6]), rel=1e-9)
    assert history["distance"][0] == pytest.approx(0.0, abs=1e-12) and history["distance"][-1] > 1e-6


def test_tracker_takes_a_kernel_and_checks_its_arguments():
    model = nn.Linear(4, 2)
    kernel = tk.Kernel(model, output="sum")
    tracker = tk.tracking.KernelTracker(kernel, [torch.randn(3, 4)])
    assert tracker.kernel is kernel and tracker.record().kernel is None  # statistics only by default
    with pytest.raises(ValueError, match="every must be a positive int"):
        tk.tracking.KernelTracker(model, [torch.randn(3, 4)], every=0)
    with pytest.raises(TypeError, match="fixes idx and its options"):
        tk.tracking.KernelTracker(kernel, [torch.randn(3, 4)], output="first")
    with pytest.raises(ValueError, match="K \\[n, n\\]"):
        tk.tracking.KernelTracker(model, [torch.randn(3, 4)], output="full").record()


def test_kernel_distance_stays_in_its_range_under_rounding():
    # 1 - cos with cos computed in float64 can be an ulp past 1; the distance is in [0, 2]
    for seed in range(20):
        K = psd(7, 7, seed) * (1 + seed / 3)
        assert 0.0 <= tk.tracking.kernel_distance(K, K) <= 1e-12
        assert 2.0 >= tk.tracking.kernel_distance(K, -K) >= 2.0 - 1e-12


# ----------------------------------------------------------------------------- Hugging Face Trainer


def test_importing_the_library_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, tangent_kernels as tk; tk.tracking.KernelTracker; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


class _Classifier(nn.Module):
    """A model in the Trainer's convention: keyword inputs, labels optional, a dict out."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def test_trainer_callback_records_at_the_trainers_steps():
    """The callback driven by transformers' own TrainerState and TrainerControl, as
    Trainer.train() calls it (on_train_begin, then on_step_end after each update): the
    records are K at the weights of those steps, labelled by global_step."""
    transformers = pytest.importorskip("transformers", reason="transformers is one of the test tools (Makefile TOOLS)")
    torch.manual_seed(0)
    model = _Classifier()
    probe = {"x": torch.randn(6, 5)}
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    tracker = tk.tracking.KernelTracker(model, [probe], every=2, targets=torch.tensor([0, 1, 2, 0, 1, 2]),
                                        output="sum", precision="fp64", keep_kernels=True)
    callback = tk.tracking.trainer_callback(tracker)
    assert isinstance(callback, transformers.TrainerCallback)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = {0: gram_autograd(model, [probe["x"]], output="sum")}
    callback.on_train_begin(None, state, control)
    for step in range(1, 6):
        optimizer.zero_grad()
        model(x, labels=y)["loss"].backward()
        optimizer.step()
        state.global_step = step
        if step % 2 == 0:
            expected[step] = gram_autograd(model.net, [probe["x"]], output="sum")
        callback.on_step_end(None, state, control)
    assert tracker.history()["step"] == [0, 2, 4]
    for record in tracker.records:
        assert torch.allclose(record.kernel, expected[record.step], rtol=1e-9, atol=1e-12)
    other = transformers.TrainerState(is_world_process_zero=False)
    callback.on_step_end(None, other, control)
    assert len(tracker.records) == 3  # only the main process records
    with pytest.raises(TypeError, match="KernelTracker"):
        tk.tracking.trainer_callback(model)


def test_trainer_callback_in_a_real_trainer(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is one of the test tools (Makefile TOOLS)")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install accelerate)")
    torch.manual_seed(0)
    model = _Classifier()
    initial = _Classifier()
    initial.load_state_dict(model.state_dict())
    data = [{"x": torch.randn(5), "labels": torch.tensor(i % 3)} for i in range(16)]
    probe = torch.randn(6, 5)
    tracker = tk.tracking.KernelTracker(model, [probe], every=2, output="sum", precision="fp64", keep_kernels=True)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=0.1, report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[tk.tracking.trainer_callback(tracker)])
    trainer.train()
    assert tracker.history()["step"] == [0, 2, 4]
    first, last = tracker.records[0].kernel, tracker.records[-1].kernel
    assert torch.allclose(first, gram_autograd(initial.net, [probe], output="sum"), rtol=1e-9, atol=1e-12)
    assert torch.allclose(last, gram_autograd(model.net, [probe], output="sum"), rtol=1e-9, atol=1e-12)
    assert tracker.records[-1].distance > 0  # the Trainer's updates moved the weights the tracker reads
