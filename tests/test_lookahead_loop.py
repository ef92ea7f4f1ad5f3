"""tk.lookahead.run_rounds on a tiny MLP: its picks and scores equal a hand-written loop
over tk.gram cross kernels; the block update (add) equals a refit inside the loop;
retrain, oracle and errors."""

import pytest
import torch
from torch import nn

import tangent_kernels as tk

ROUNDS, PER_ROUND, M0, POOL, TEST = 3, 4, 10, 40, 20


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(M0 + POOL + TEST, 5, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    L, P, T = slice(0, M0), slice(M0, M0 + POOL), slice(M0 + POOL, None)
    return (X[L], y[L]), (X[P], y[P]), (X[T], y[T])


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def gram(net, A, B=None):
    return tk.gram(net, A, None, B, output="sum", precision="fp64", progress=False)


def hand_loop(net, labelled, pool, test):
    """The docs' round loop written out: every kernel its own tk.gram call (cross kernels)."""
    (XL, yL), (XP, yP), (XT, yT) = labelled, pool, test
    with torch.no_grad():
        f = {name: net(x).double() for name, x in (("L", XL), ("P", XP), ("T", XT))}
    KLL = gram(net, XL)
    la = tk.LookAhead(KLL, nn.functional.one_hot(yL, 3).double(), f0=f["L"], beta=1e-3 * float(KLL.diagonal().mean()))
    L, C = torch.empty(0, dtype=torch.long), torch.arange(len(XP))
    picks, scores, acc = [], [], []

    def accuracy():
        K_TL = torch.cat([gram(net, XT, XL), gram(net, XT, XP[L])], 1) if len(L) else gram(net, XT, XL)
        return float((la.predict(K_TL, f["T"]).argmax(1) == yT).double().mean())

    acc.append(accuracy())
    for _ in range(ROUNDS):
        XLnow = torch.cat([XL, XP[L]])
        K_CL, K_CC = gram(net, XP[C], XLnow), gram(net, XP[C])
        pred = la.predict(K_CL, f["P"][C])
        s = tk.lookahead.most_likely_change(la, K_CL, K_CC.diagonal(), K_CL, K_CC, f0_C=f["P"][C], f0_E=f["P"][C],
                                            outputs=pred, reference=pred)
        sel = tk.lookahead.select(s, PER_ROUND)
        A = C[sel]
        la.add(gram(net, XP[A], XLnow), gram(net, XP[A]), nn.functional.one_hot(yP[A], 3).double(), f["P"][A])
        L, C = torch.cat([L, A]), C[~torch.isin(C, A)]
        picks.append(A)
        scores.append(s)
        acc.append(accuracy())
    return picks, scores, acc, la


def assert_same_picks(picks, scores, h):
    assert len(h.picked) == len(picks) == ROUNDS
    for r in range(ROUNDS):
        torch.testing.assert_close(h.scores[r], scores[r], rtol=1e-9, atol=1e-12)
        # equal picks is the contract wherever the selection boundary is not a near-tie
        top = scores[r].sort(descending=True).values
        assert float(top[PER_ROUND - 1] - top[PER_ROUND]) > 1e-6 * float(top[0])
        assert h.picked[r].tolist() == picks[r].tolist()


def test_run_rounds_equals_a_hand_written_loop():
    labelled, pool, test = data()
    net = mlp()
    picks, scores, acc, la = hand_loop(net, labelled, pool, test)
    h = tk.lookahead.run_rounds(net, labelled, pool, test=test, strategy="look-ahead", rounds=ROUNDS,
                                per_round=PER_ROUND, precision="fp64")
    assert_same_picks(picks, scores, h)
    assert h.accuracy == pytest.approx(acc, abs=1e-12)
    assert h.labelled == [M0 + r * PER_ROUND for r in range(ROUNDS + 1)]
    assert len(h.seconds) == ROUNDS + 1 and h.network_accuracy == [h.network_accuracy[0]] * (ROUNDS + 1)
    torch.testing.assert_close(h.lookahead.alpha, la.alpha, rtol=1e-9, atol=1e-12)


def test_add_equals_refit_inside_the_loop():
    """retrain that leaves the network as it is: every round recomputes the kernels and
    builds a new factor (the reference code's refactorization) instead of ``add``. The
    ridge is absolute: a relative one is recomputed from K_LL at every rebuild."""
    labelled, pool, test = data(1)
    net = mlp(1)
    calls = []

    def keep(model, X, y):
        calls.append((model is not net, len(X), y.tolist()))

    args = dict(test=test, rounds=ROUNDS, per_round=PER_ROUND, precision="fp64", beta=1e-2, beta_scale=None)
    added = tk.lookahead.run_rounds(net, labelled, pool, **args)
    refit = tk.lookahead.run_rounds(net, labelled, pool, retrain=keep, **args)
    assert_same_picks(added.picked, added.scores, refit)
    assert refit.accuracy == pytest.approx(added.accuracy, abs=1e-12)
    torch.testing.assert_close(refit.lookahead.alpha, added.lookahead.alpha, rtol=1e-8, atol=1e-10)
    # retrain saw a copy of the network and L as it grew, with the oracle's labels
    (_, yL), (_, yP) = labelled, pool
    order = torch.cat(added.picked)
    assert [c[:2] for c in calls] == [(True, M0 + (r + 1) * PER_ROUND) for r in range(ROUNDS)]
    assert calls[-1][2] == torch.cat([yL, yP[order]]).tolist()


def test_retrain_rebuilds_kernels_and_leaves_the_model_alone():
    labelled, pool, test = data(2)
    net = mlp(2)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def train(model, X, y):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(20):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()

    h = tk.lookahead.run_rounds(net, labelled, pool, test=test, strategy="margin", rounds=2, per_round=5,
                                precision="fp64", retrain=train)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert h.model is not net and any(not torch.equal(v, h.model.state_dict()[k]) for k, v in before.items())
    # the final factor is that of the retrained network's kernels on the final L
    (XL, yL), (XP, _) = labelled, pool
    XLf = torch.cat([XL, XP[torch.cat(h.picked)]])
    K = gram(h.model, XLf)
    with torch.no_grad():
        f0 = h.model(XLf).double()
    yLf = torch.cat([yL, pool[1][torch.cat(h.picked)]])
    ref = tk.LookAhead(K, nn.functional.one_hot(yLf, 3).double(), f0=f0, beta=1e-3 * float(K.diagonal().mean()))
    torch.testing.assert_close(h.lookahead.alpha, ref.alpha, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("strategy", ["random", "entropy", "expected-change", "disagreement"])
def test_oracle_and_strategies(strategy):
    labelled, (XP, yP), test = data(3)
    net = mlp(3)
    asked = []

    def oracle(positions):
        asked.append(positions.tolist())
        return yP[positions]

    with_labels = tk.lookahead.run_rounds(net, labelled, (XP, yP), test=test, strategy=strategy, rounds=2,
                                          per_round=3, precision="fp64", seed=5)
    with_oracle = tk.lookahead.run_rounds(net, labelled, XP, test=test, strategy=strategy, rounds=2, per_round=3,
                                          precision="fp64", seed=5, oracle=oracle)
    assert [p.tolist() for p in with_oracle.picked] == [p.tolist() for p in with_labels.picked] == asked
    assert len(set(sum(asked, []))) == 6  # no point picked twice


def test_full_entk_and_separate_evaluation_points():
    labelled, pool, test = data(4)
    net = mlp(4)
    args = dict(evaluation=test[0], rounds=2, per_round=3, precision="fp64", output="full", beta=1e-2,
                beta_scale=None)
    added = tk.lookahead.run_rounds(net, labelled, pool, **args)
    refit = tk.lookahead.run_rounds(net, labelled, pool, retrain=lambda *a: None, **args)
    assert added.lookahead.full and added.accuracy == []
    assert [p.tolist() for p in added.picked] == [p.tolist() for p in refit.picked]
    torch.testing.assert_close(refit.lookahead.alpha, added.lookahead.alpha, rtol=1e-8, atol=1e-10)


def test_errors_name_the_problem():
    labelled, pool, test = data()
    net = mlp()
    with pytest.raises(ValueError, match="rounds \\* per_round = 50 points but the pool has 40"):
        tk.lookahead.run_rounds(net, labelled, pool, rounds=5, per_round=10)
    with pytest.raises(ValueError, match="strategy must be one of"):
        tk.lookahead.run_rounds(net, labelled, pool, strategy="best", rounds=1)
    with pytest.raises(ValueError, match="integer class labels"):
        tk.lookahead.run_rounds(net, (labelled[0], labelled[1].double()), pool, rounds=1)
    with pytest.raises(ValueError, match="pool needs its labels"):
        tk.lookahead.run_rounds(net, labelled, pool[0], rounds=1)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 3\\)"):
        tk.lookahead.run_rounds(net, labelled, (pool[0], pool[1] + 3), rounds=1, per_round=1)
    with pytest.raises(TypeError, match="evaluation must be the inputs X_E .* pass test="):
        tk.lookahead.run_rounds(net, labelled, pool, rounds=1, evaluation=test)
    with pytest.raises(ValueError, match="per_round must be a positive int"):
        tk.lookahead.run_rounds(net, labelled, pool, rounds=1, per_round=0)
    with pytest.raises(TypeError, match="retrain must return None"):
        tk.lookahead.run_rounds(net, labelled, pool, rounds=1, per_round=1, retrain=lambda *a: 3)
