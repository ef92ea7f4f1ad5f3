"""What a resume must agree on: every change that can make the model or the output compute
something else, made between an interrupted run and its resume, is refused with
CheckpointMismatch naming it; what cannot be fingerprinted needs checkpoint_key=; a folder
the library did not write is refused, not overwritten; the fingerprint is the same in
another process (another hash seed, other hook handle ids)."""

import functools
import os
import subprocess
import sys
import textwrap
import threading
import types

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from tangent_kernels import tuning
from tangent_kernels.checkpoint import CheckpointMismatch
from tangent_kernels.identity import computation_fingerprint

N, BATCH = 14, 4
SCALE = 1.0  # read by Scaled.forward
INDEX = 0  # read by _column, the helper of the output callable pick_by_helper
COLUMNS = [0]  # a global list read by pick_by_list
helpers = types.ModuleType("tk_resume_helpers")  # a user's module of constants, read as helpers.FACTOR
helpers.FACTOR = 1.0
sys.modules[helpers.__name__] = helpers


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(5, 8)
        self.act = nn.GELU()
        self.lin2 = nn.Linear(8, 3)
        self.scale = 1.0

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x))) * self.scale * SCALE * helpers.FACTOR


def _column(o):
    return o[:, INDEX]


def pick_by_helper(o):
    return _column(o)


class Choice:
    column = 0


def pick_by_class(o):
    return o[:, Choice.column]


def pick_by_list(o):
    return o[:, COLUMNS].sum(dim=1)


class Interrupt(Exception):
    pass


def _stop_after_two_batches(event):
    if event.phase == "features" and event.done >= 2 * BATCH and not event.resumed:
        raise Interrupt


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(tuning.settings, "tile_rows", 4)
    yield
    COLUMNS[:] = [0]  # mutated in place by a test


def _problem():
    torch.manual_seed(0)
    model = Scaled()
    x = torch.randn(N, 5)
    return model, list(x.split(BATCH))


def _interrupted(model, loader, folder, **kwargs):
    with pytest.raises(Interrupt):
        tk.gram(model, loader, checkpoint=folder, callback=_stop_after_two_batches, progress=False, **kwargs)


def _hook(module, args, output):
    return output * 2


def _pre_hook(module, args):
    return (args[0] * 2,)


def _set_global(name, value):
    return lambda model, monkeypatch: monkeypatch.setattr(sys.modules[__name__], name, value)


def _replace_forward(model, monkeypatch):
    original = model.forward
    model.forward = lambda x: original(x) * 3


CHANGES = {
    # name: (what is changed, the output, what the error must name)
    "module attribute": (lambda m, mp: setattr(m, "scale", 2.0), "first", r"scale"),
    "global read by forward": (_set_global("SCALE", 2.0), "first", r"SCALE"),
    "a user module's global": (lambda m, mp: mp.setattr(helpers, "FACTOR", 2.0), "first", r"tk_resume_helpers\.FACTOR"),
    "forward hook": (lambda m, mp: m.lin1.register_forward_hook(_hook), "first", r"lin1.*hook"),
    "forward pre-hook": (lambda m, mp: m.register_forward_pre_hook(_pre_hook), "first", r"hook"),
    "requires_grad": (lambda m, mp: m.lin2.bias.requires_grad_(False), "first", r"lin2\.bias.*requires_grad"),
    "instance forward": (_replace_forward, "first", r"forward"),
    "GELU approximate": (lambda m, mp: setattr(m.act, "approximate", "tanh"), "first", r"act\.approximate"),
    "output helper's global": (_set_global("INDEX", 2), pick_by_helper, r"INDEX"),
    "output class attribute": (lambda m, mp: mp.setattr(Choice, "column", 2), pick_by_class, r"Choice"),
    "output global list": (lambda m, mp: COLUMNS.__setitem__(0, 2), pick_by_list, r"COLUMNS"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_between_interruption_and_resume_is_refused_naming_it(tmp_path, monkeypatch, change):
    alter, output, named = CHANGES[change]
    model, loader = _problem()
    _interrupted(model, loader, tmp_path, output=output)
    alter(model, monkeypatch)
    with pytest.raises(CheckpointMismatch, match=named):
        tk.gram(model, loader, checkpoint=tmp_path, output=output, progress=False)


@pytest.mark.parametrize("output", ["first", pick_by_helper, pick_by_class, pick_by_list])
def test_no_change_resumes_to_the_same_bits(tmp_path, output):
    model, loader = _problem()
    base = tk.gram(model, loader, output=output, progress=False)
    _interrupted(model, loader, tmp_path, output=output)
    events = []
    k = tk.gram(model, loader, checkpoint=tmp_path, output=output, callback=events.append, progress=False)
    assert torch.equal(k, base)
    assert sum(e.resumed for e in events if e.phase == "features") == 2


def test_a_change_undone_resumes(tmp_path):
    model, loader = _problem()
    base = tk.gram(model, loader, progress=False)
    _interrupted(model, loader, tmp_path)
    handle = model.lin1.register_forward_hook(_hook)
    model.scale = 2.0
    with pytest.raises(CheckpointMismatch):
        tk.gram(model, loader, checkpoint=tmp_path, progress=False)
    handle.remove()
    model.scale = 1.0
    assert torch.equal(tk.gram(model, loader, checkpoint=tmp_path, progress=False), base)


class Guarded(Scaled):
    def forward(self, x):
        with self.guard:  # an object whose state cannot be read, read by forward
            return super().forward(x)


def test_undecidable_model_state_needs_a_checkpoint_key(tmp_path):
    torch.manual_seed(0)
    model, loader = Guarded(), _problem()[1]
    model.guard = threading.Lock()
    base = tk.gram(model, loader, progress=False)
    _interrupted(model, loader, tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"guard.*checkpoint_key="):
        tk.gram(model, loader, checkpoint=tmp_path, progress=False)
    keyed = tmp_path / "keyed"
    _interrupted(model, loader, keyed, checkpoint_key="run-1")
    assert torch.equal(tk.gram(model, loader, checkpoint=keyed, checkpoint_key="run-1", progress=False), base)


def test_an_object_no_code_reads_is_not_part_of_the_computation():
    """A module attribute holding an object that no code reachable from the model's call
    names (as GPT-2's generation_config, read by generate()) neither changes K nor needs a
    key; a plain value is fingerprinted wherever it is."""
    model, _ = _problem()
    before = computation_fingerprint(model)
    model.notes = threading.Lock()
    model.extra = {"seen": [1, 2]}
    assert computation_fingerprint(model).digest == before.digest and not computation_fingerprint(model).undecidable
    model.unused_number = 3
    assert computation_fingerprint(model).digest != before.digest


def test_a_folder_the_library_did_not_write_is_refused_untouched(tmp_path):
    model, loader = _problem()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(CheckpointMismatch, match="not written by tangent_kernels"):
        tk.gram(model, loader, checkpoint=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and notes.read_text() == "mine"
    # an empty folder, or one holding only what an interrupted start leaves (the lock), is the library's
    (tmp_path / "empty").mkdir()
    assert tk.gram(model, loader, checkpoint=tmp_path / "empty", progress=False).shape == (N, N)


def _fingerprint_script(seed: int) -> str:
    return textwrap.dedent(f"""
        import sys, json, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from torch import nn
        import test_resume_identity as t
        from tangent_kernels.identity import computation_fingerprint
        for _ in range({seed}):  # hook handle ids differ between the processes
            nn.Linear(1, 1).register_forward_hook(t._hook).remove()
        model, _ = t._problem()
        model.table = {{name: len(name) for name in {{'alpha', 'beta', 'gamma', 'delta'}}}}  # order from a set
        model.names = {{'alpha', 'beta', 'gamma'}}
        model.lin1.register_forward_hook(t._hook)
        digests = [computation_fingerprint(model, t.pick_by_helper).digest]
        # GPT-2 holds generation_config, whose state has a hash() of a string (seed-dependent)
        from transformers import GPT2Config, GPT2LMHeadModel
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
        digests.append(computation_fingerprint(gpt2).digest)
        print(json.dumps(digests))
    """)


@pytest.mark.slow  # two interpreters importing transformers
def test_the_fingerprint_is_the_same_in_another_process():
    pytest.importorskip("transformers")
    digests = set()
    for seed in (0, 3):
        result = subprocess.run([sys.executable, "-c", _fingerprint_script(seed)], capture_output=True, text=True,
                                timeout=300, env=dict(os.environ, PYTHONHASHSEED=str(seed + 1)))
        assert result.returncode == 0, result.stderr
        digests.add(result.stdout.strip())
    assert len(digests) == 1


def test_the_fingerprint_sees_what_the_issue_lists_without_a_checkpoint():
    model, _ = _problem()
    before = computation_fingerprint(model, pick_by_helper)
    assert not before.undecidable
    model.act = nn.GELU(approximate="tanh")
    after = computation_fingerprint(model, pick_by_helper)
    assert after.digest != before.digest
    assert [k for k in sorted(set(before.parts) | set(after.parts)) if before.parts.get(k) != after.parts.get(k)] \
        == ["act.approximate"]
    # a partial and a bound method of another object carry their arguments and state
    assert computation_fingerprint(model, functools.partial(torch.select, dim=1, index=0)).digest != \
        computation_fingerprint(model, functools.partial(torch.select, dim=1, index=1)).digest


def test_a_module_outside_the_model_and_a_cached_function_are_read():
    """A module the output holds (its weights, its hooks in order, without handle ids) and
    a functools.lru_cache'd helper (a C wrapper: read through __wrapped__)."""
    model, _ = _problem()
    torch.manual_seed(1)
    head = nn.Linear(3, 1)

    def output(o):
        return head(o)[:, 0]

    first = computation_fingerprint(model, output)
    assert not first.undecidable and computation_fingerprint(model, output).digest == first.digest
    head.register_forward_hook(_hook)
    assert computation_fingerprint(model, output).digest != first.digest

    @functools.lru_cache(maxsize=None)
    def column():
        return 0

    cached = computation_fingerprint(model, lambda o: o[:, column()])
    assert not cached.undecidable


def test_the_fingerprint_of_real_models_is_cheap_and_decided():
    """Measured 10-40 ms for resnet50 and BERT-base (2-core CPU); the bound only catches a
    walk gone exponential."""
    import time

    torchvision = pytest.importorskip("torchvision")
    transformers = pytest.importorskip("transformers")
    models = [torchvision.models.resnet18(), transformers.BertModel(transformers.BertConfig(num_hidden_layers=2))]
    for model in models:
        start = time.perf_counter()
        fingerprint = computation_fingerprint(model)
        assert time.perf_counter() - start < 1.0
        assert not fingerprint.undecidable, fingerprint.undecidable
        assert computation_fingerprint(model).digest == fingerprint.digest


def test_what_a_library_adds_to_its_classes_counts_only_where_called(monkeypatch):
    """Importing transformers adds nn.Module.smart_apply: a model that never calls it is the
    same computation with or without it; replacing a method the model calls is not."""
    model, _ = _problem()
    before = computation_fingerprint(model).digest
    monkeypatch.setattr(nn.Module, "added_by_a_library", lambda self: None, raising=False)
    assert computation_fingerprint(model).digest == before
    original = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: original(self, x) * 2)
    assert computation_fingerprint(model).digest != before
