"""tk.LookAhead: predict, what_if and add against direct float64 solves of the augmented
kernel system, on random PSD kernels of both forms (scalar [m, m], with one or k outputs,
and the full eNTK [m, m, k, k]); the chunked/reduced path; errors; acquisition scores."""

import numpy as np
import pytest
import torch

import tangent_kernels as tk
from tangent_kernels import lookahead as la_mod

TOL = 1e-8  # the exactness target, against float64 direct solves
FORMS = ["scalar", "pntk", "full"]


def problem(form, m=13, c=7, e=5, r=3, k=3, f0=True, seed=0):
    """Kernels from one feature map G (p > all points, so every augmented system is PD):
    points 0..m-1 labelled, then c candidates, then e evaluation points."""
    g = torch.Generator().manual_seed(seed)
    n = m + c + e
    if form == "full":
        G = torch.randn(n, k, 4 * n * k, generator=g, dtype=torch.float64) / n
        K = torch.einsum("iap,jbp->ijab", G, G)
    else:
        G = torch.randn(n, 4 * n, generator=g, dtype=torch.float64) / n ** 0.5
        K = G @ G.T
    tail = [] if form == "scalar" else [k]
    y = torch.randn([n] + tail, generator=g, dtype=torch.float64)
    f = torch.randn([n] + tail, generator=g, dtype=torch.float64) * 0.3 if f0 else None
    yC = torch.randn([c, r] + tail, generator=g, dtype=torch.float64)
    L, C, E = slice(0, m), slice(m, m + c), slice(m + c, n)
    diag = K[C, C].diagonal(dim1=0, dim2=1)
    kCC = diag if form != "full" else diag.permute(2, 0, 1)
    return dict(K=K, y=y, f=f, yC=yC, L=L, C=C, E=E, kCC=kCC, form=form, k=k)


def flat(K, form):
    if form != "full":
        return K
    n1, n2, k, _ = K.shape
    return K.permute(0, 2, 1, 3).reshape(n1 * k, n2 * k)


def direct(K, y, f, train, test, beta, form):
    """f(test) of kernel regression on the points ``train`` by one dense float64 solve.
    The pNTK form solves its k outputs as k columns of the same scalar system."""
    Kt = flat(K[train][:, train], form)
    A = Kt + beta * torch.eye(Kt.shape[0], dtype=torch.float64)
    res = y[train] - (f[train] if f is not None else 0)
    rhs = res.reshape(Kt.shape[0], -1)
    alpha = torch.linalg.solve(A, rhs)
    out = flat(K[test][:, train], form) @ alpha
    out = out.reshape(y[test].shape)
    return out + (f[test] if f is not None else 0)


def make(P, beta):
    K, L = P["K"], P["L"]
    return tk.LookAhead(K[L, L], P["y"][L], f0=P["f"][L] if P["f"] is not None else None, beta=beta)


def args(P):
    K, C, E, L, f = P["K"], P["C"], P["E"], P["L"], P["f"]
    return (K[C, L], P["kCC"], K[E, L], K[E, C], P["yC"]), dict(
        f0_C=f[C] if f is not None else None, f0_E=f[E] if f is not None else None)


def what_if_direct(P, beta):
    """[c, r, e(, k)] by one augmented solve per (candidate, label)."""
    K, L, C, E = P["K"], P["L"], P["C"], P["E"]
    idx = torch.arange(K.shape[0])
    Lidx, Cidx, Eidx = idx[L], idx[C], idx[E]
    out = []
    for ci, c in enumerate(Cidx):
        rows = []
        for r in range(P["yC"].shape[1]):
            y = P["y"].clone()
            y[c] = P["yC"][ci, r]
            train = torch.cat([Lidx, c.view(1)])
            rows.append(direct(K, y, P["f"], train, Eidx, beta, P["form"]))
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_f0", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_predict_and_what_if_match_direct_solves(form, with_f0, beta):
    P = problem(form, f0=with_f0, seed=4 * FORMS.index(form) + 2 * with_f0 + (beta > 0))  # str hashes vary per run
    la = make(P, beta)
    idx = torch.arange(P["K"].shape[0])
    a, kw = args(P)
    ref_pred = direct(P["K"], P["y"], P["f"], idx[P["L"]], idx[P["E"]], beta, form)
    torch.testing.assert_close(la.predict(P["K"][P["E"], P["L"]], kw["f0_E"]), ref_pred, rtol=0, atol=TOL)
    got = la.what_if(*a, **kw)
    ref = what_if_direct(P, beta)
    assert got.shape == ref.shape == (7, 3, 5) + (() if form == "scalar" else (3,))
    torch.testing.assert_close(got, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("form", FORMS)
def test_chunked_reduce_equals_full_output(form):
    P = problem(form, c=11)
    la = make(P, 0.1)
    a, kw = args(P)
    full = la.what_if(*a, **kw)
    seen = []

    def reduce(pred):
        seen.append(pred.shape[0])
        return pred.reshape(pred.shape[0], pred.shape[1], -1).sum(-1)

    for chunk in (1, 4, 11, 50):
        seen.clear()
        got = la.what_if(*a, **kw, chunk=chunk, reduce=reduce)
        assert max(seen) <= chunk and sum(seen) == 11
        torch.testing.assert_close(got, full.reshape(11, 3, -1).sum(-1), rtol=0, atol=TOL)
        torch.testing.assert_close(la.what_if(*a, **kw, chunk=chunk), full, rtol=0, atol=TOL)


def test_pntk_equals_full_form_with_identity_blocks():
    """A scalar kernel with [m, k] targets is the full eNTK K (x) I_k: same predictions."""
    P = problem("pntk")
    Kfull = P["K"][:, :, None, None] * torch.eye(3, dtype=torch.float64)
    Q = dict(P, K=Kfull, form="full", kCC=P["kCC"][:, None, None] * torch.eye(3, dtype=torch.float64))
    a, kw = args(P)
    b, kwb = args(Q)
    torch.testing.assert_close(make(P, 0.2).what_if(*a, **kw), make(Q, 0.2).what_if(*b, **kwb), rtol=0, atol=TOL)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", [0.0, 0.3])
@pytest.mark.parametrize("steps", [(10, 2, 4), (3,) + (1,) * 13])  # the second passes the block limit
def test_add_equals_refit_and_direct_solves(form, beta, steps):
    P = problem(form, m=16, c=6, e=5)
    K, f, y = P["K"], P["f"], P["y"]
    m0 = steps[0]
    la = tk.LookAhead(K[:m0, :m0], y[:m0], f0=f[:m0], beta=beta)
    for a in steps[1:]:
        s, t = la.m, la.m + a
        la.add(K[s:t, :s], K[s:t, s:t], y[s:t], f[s:t])
        assert la.m == t
        torch.testing.assert_close(la.alpha, tk.LookAhead(K[:t, :t], y[:t], f0=f[:t], beta=beta).alpha,
                                   rtol=0, atol=TOL)
    assert la.m == 16
    fresh = make(P, beta)
    torch.testing.assert_close(la.alpha, fresh.alpha, rtol=0, atol=TOL)
    idx = torch.arange(K.shape[0])
    torch.testing.assert_close(la.predict(K[P["E"], P["L"]], f[P["E"]]),
                               direct(K, P["y"], f, idx[P["L"]], idx[P["E"]], beta, form), rtol=0, atol=TOL)
    a, kw = args(P)
    torch.testing.assert_close(la.what_if(*a, **kw), what_if_direct(P, beta), rtol=0, atol=TOL)


def test_inputs_are_not_modified_and_numpy_works():
    P = problem("scalar", f0=True)
    K = P["K"][P["L"], P["L"]].clone()
    before = K.clone()
    la = tk.LookAhead(K, P["y"][P["L"]], f0=P["f"][P["L"]], beta=0.5)
    assert torch.equal(K, before)
    a, kw = args(P)
    copies = [x.clone() for x in a] + [v.clone() for v in kw.values()]
    la.what_if(*a, **kw, chunk=2)
    la_mod.output_change(la, *a, **kw, reference=la.predict(a[2], kw["f0_E"]))
    la.add(P["K"][P["C"], P["L"]][:2], P["K"][P["C"], P["C"]][:2, :2], P["yC"][:2, 0], P["f"][P["C"]][:2])
    assert all(torch.equal(x, y) for x, y in zip(list(a) + list(kw.values()), copies))
    la = tk.LookAhead(K, P["y"][P["L"]], f0=P["f"][P["L"]], beta=0.5)
    la_np = tk.LookAhead(K.numpy().astype(np.float32), P["y"][P["L"]].numpy(), f0=P["f"][P["L"]].numpy(), beta=0.5)
    a, kw = args(P)
    got = la_np.what_if(*(x.numpy() for x in a), **{n: v.numpy() for n, v in kw.items()})
    torch.testing.assert_close(got, la.what_if(*a, **kw), rtol=0, atol=1e-4)  # K rounded to float32 on input


@pytest.mark.parametrize("form", FORMS)
def test_float32_working_precision(form):
    """dtype=float32 on a well-conditioned problem: within float32's reach of float64."""
    P = problem(form, f0=True)
    a, kw = args(P)
    K, L = P["K"], P["L"]
    la32 = tk.LookAhead(K[L, L], P["y"][L], f0=P["f"][L], beta=0.3, dtype=torch.float32)
    got = la32.what_if(*a, **kw)
    ref = make(P, 0.3).what_if(*a, **kw)
    assert got.dtype == torch.float32
    assert float((got.double() - ref).abs().max() / ref.abs().max()) < 1e-4


def test_many_candidates_stay_within_chunk():
    """50,000 candidates: reduce sees chunks of at most ``chunk``; the [c, r, e, k] never forms."""
    g = torch.Generator().manual_seed(1)
    m, c, e, k = 8, 50_000, 4, 3
    G = torch.randn(m + c + e, 40, generator=g, dtype=torch.float64)
    GL, GC, GE = G[:m], G[m:m + c], G[m + c:]
    la = tk.LookAhead(GL @ GL.T, torch.randn(m, k, generator=g, dtype=torch.float64), beta=1e-3)
    biggest = []
    scores = la.what_if(GC @ GL.T, (GC * GC).sum(1), GE @ GL.T, GE @ GC.T,
                        torch.eye(k, dtype=torch.float64).expand(c, k, k), chunk=4096,
                        reduce=lambda p: (biggest.append(p.shape[0]), p.abs().sum((2, 3)))[1])
    assert scores.shape == (c, k) and max(biggest) <= 4096 and torch.isfinite(scores).all()


def test_errors_name_the_problem():
    P = problem("scalar", f0=False)
    K, L = P["K"], P["L"]
    a, kw = args(P)
    with pytest.raises(ValueError, match="K_LL must be"):
        tk.LookAhead(K[L, :5], P["y"][L])
    with pytest.raises(ValueError, match=r"y_L must have shape \[13\]"):
        tk.LookAhead(K[L, L], P["y"][:4])
    with pytest.raises(TypeError, match="one_hot"):
        tk.LookAhead(K[L, L], torch.zeros(13, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype must be"):
        tk.LookAhead(K[L, L], P["y"][L], dtype=torch.float16)
    with pytest.raises(ValueError, match="beta must be finite"):
        tk.LookAhead(K[L, L], P["y"][L], beta=-1.0)
    with pytest.raises(ValueError, match="not symmetric"):
        tk.LookAhead(K[L, L] + torch.triu(torch.ones(13, 13, dtype=torch.float64), 1), P["y"][L])
    dup = torch.cat([K[L, L], K[:1, L]])
    Kdup = torch.cat([dup, dup[:, :1]], 1)  # point 0 twice: singular at beta = 0
    with pytest.raises(ValueError, match="beta > 0"):
        tk.LookAhead(Kdup, torch.zeros(14, dtype=torch.float64))
    la = make(P, 0.0)
    # candidate 2 is labelled point 0 again: its augmented system is singular at beta = 0
    KCL, kCC, KEL, KEC, yC = a
    KCL, kCC, KEC = KCL.clone(), kCC.clone(), KEC.clone()
    KCL[2], kCC[2], KEC[:, 2] = K[0, L], K[0, 0], K[P["E"], 0]
    with pytest.raises(ValueError, match=r"candidate\(s\) \[2\].*beta > 0"):
        la.what_if(KCL, kCC, KEL, KEC, yC)
    assert torch.isfinite(make(P, 1e-3).what_if(KCL, kCC, KEL, KEC, yC)).all()
    with pytest.raises(ValueError, match="Schur complement of the new points.*beta > 0"):
        la.add(K[:1, L], K[:1, :1], P["y"][:1])  # labelled point 0 again
    assert la.m == 13  # a refused add changes nothing
    with pytest.raises(ValueError, match=r"K_EC must have shape \[5, 7\]"):
        la.what_if(KCL, kCC, KEL, KEC.T, yC)
    with pytest.raises(ValueError, match="k_CC must have shape"):
        la.what_if(KCL, kCC[:3], KEL, KEC, yC)
    with pytest.raises(ValueError, match="reduce must return"):
        la.what_if(*a, reduce=lambda p: p.sum())
    with pytest.raises(ValueError, match="chunk must be"):
        la.what_if(*a, chunk=0)
    with pytest.raises(ValueError, match="non-finite"):
        la.predict(torch.full((2, 13), float("nan"), dtype=torch.float64))


# ----------------------------------------------------------------------------- acquisition


def test_look_ahead_criteria_equal_their_definitions():
    P = problem("pntk", f0=True)
    la = make(P, 0.1)
    a, kw = args(P)
    KCL, kCC, KEL, KEC, _ = a
    k, c = 3, 7
    f0C, f0E = kw["f0_C"], kw["f0_E"]
    every = la.what_if(KCL, kCC, KEL, KEC, torch.eye(k, dtype=torch.float64).expand(c, k, k), **kw)
    change = (every - f0E).norm(dim=-1).sum(-1)  # [c, k]: sum_e ||f+(e) - f0(e)||
    mlmoc = la_mod.most_likely_change(la, KCL, kCC, KEL, KEC, **kw, chunk=2)
    torch.testing.assert_close(mlmoc, change[torch.arange(c), f0C.argmax(1)], rtol=0, atol=TOL)
    emoc = la_mod.expected_change(la, KCL, kCC, KEL, KEC, **kw, chunk=3)
    torch.testing.assert_close(emoc, (torch.softmax(f0C, 1) * change).sum(1), rtol=0, atol=TOL)
    ref = la.predict(KEL, f0E)
    from_kernel = la_mod.output_change(la, KCL, kCC, KEL, KEC, P["yC"][:, :1], reference=ref, **kw)
    direct_change = (la.what_if(*a[:4], P["yC"][:, :1], **kw) - ref).norm(dim=-1).sum(-1)[:, 0]
    torch.testing.assert_close(from_kernel, direct_change, rtol=0, atol=TOL)


def test_reference_shape_is_checked():
    P = problem("pntk")
    a, kw = args(P)
    with pytest.raises(ValueError, match=r"reference must have shape \[5, 3\]"):
        la_mod.output_change(make(P, 0.1), *a, **kw, reference=torch.zeros(5, dtype=torch.float64))


def test_class_criteria_refuse_one_output():
    P = problem("scalar")
    a, kw = args(P)
    with pytest.raises(ValueError, match="need k outputs"):
        la_mod.most_likely_change(make(P, 0.1), *a[:4], **kw)


def test_baselines():
    out = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [2.0, 2.0, -9.0]], dtype=torch.float64)
    ent = la_mod.entropy(out)
    assert ent[0] == pytest.approx(np.log(3)) and ent[1] < ent[2] < ent[0]
    mar = la_mod.margin(out)
    assert mar[0] == pytest.approx(0.0) and mar[2] == pytest.approx(0.0, abs=1e-6) and mar[1] < -0.9
    assert la_mod.select(torch.tensor([0.1, 0.9, 0.5, 0.9]), 3).tolist() == [1, 3, 2]
    assert la_mod.select(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2, exclude=[1]).tolist() == [3, 2]
    r = la_mod.random_scores(100, generator=torch.Generator().manual_seed(0))
    assert r.shape == (100,) and 0 <= float(r.min()) and float(r.max()) < 1
    with pytest.raises(ValueError, match="only 3 candidates"):
        la_mod.select(torch.zeros(4), 4, exclude=[0])


@pytest.mark.parametrize("form", ["pntk", "full"])
def test_pseudo_label_disagreement_equals_its_definition(form):
    P = problem(form, f0=True, e=9, seed=11)
    la = make(P, 0.1)
    a, kw = args(P)
    KCL, kCC, KEL, KEC, _ = a
    f0C, f0E = kw["f0_C"], kw["f0_E"]
    label = torch.nn.functional.one_hot(f0C.argmax(1), 3).double().unsqueeze(1)
    after = la.what_if(KCL, kCC, KEL, KEC, label, **kw)[:, 0]  # [c, e, k], checked against direct solves above
    flips = (after.argmax(-1) != f0E.argmax(1)).double().mean(1)
    top = after.topk(2, dim=-1).values  # no near-tie between classes: the argmax is not rounding's choice
    assert float((top[..., 0] - top[..., 1]).min()) > 1e-9
    got = la_mod.pseudo_label_disagreement(la, KCL, kCC, KEL, KEC, **kw, chunk=2)
    assert torch.equal(got, flips) and got.shape == (7,)
    ref = la.predict(KEL, f0E)
    from_kernel = la_mod.pseudo_label_disagreement(la, KCL, kCC, KEL, KEC, **kw, reference=ref)
    assert torch.equal(from_kernel, (after.argmax(-1) != ref.argmax(1)).double().mean(1))
    with pytest.raises(ValueError, match="pass f0_E .* or reference"):
        la_mod.pseudo_label_disagreement(la, KCL, kCC, KEL, KEC, f0_C=f0C)
