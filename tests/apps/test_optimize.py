"""Generative optimisation (Algorithms 1 and 2 of Guo et al., NeurIPS 2024) and the subspace
simulation (docs/mathematics.md#generative-optimisation). Fast: the exact analytic score, few rounds and respaced steps."""
import json
import math

import pytest
import torch

from gradguide.experiments.analytic import SubspaceGaussian
from gradguide.experiments.nets import SmallScoreNet, UNet1D, count_parameters
from gradguide.experiments.optimize import optimize
from gradguide.experiments.simulation import Simulation, diffusion_loss, load_small


@pytest.fixture(scope="module")
def sim():
    return Simulation(0)


@pytest.fixture(scope="module")
def exact(sim):
    return SubspaceGaussian(sim.schedule, sim.basis)


def test_simulation_geometry(sim):
    A = sim.basis64
    assert torch.allclose(A.T @ A, torch.eye(16, dtype=torch.float64), atol=1e-12)
    P = A @ A.T
    for theta in (sim.theta1, sim.theta2):
        assert abs(float(theta.norm()) - 1) < 1e-12
    assert float((sim.theta1 - P @ sim.theta1).norm()) < 1e-12           # θ1 on the subspace
    par, perp = P @ sim.theta2, sim.theta2 - P @ sim.theta2
    assert abs(float(perp.norm() / par.norm()) - 9.0) < 1e-9            # ‖θ_⊥‖/‖θ_∥‖ = 9
    x = sim.sample_data(256, generator=torch.Generator().manual_seed(0))
    assert float(sim.r_off(x).max()) < 1e-5
    # same seed, same problem; another seed, another A
    assert torch.equal(Simulation(0).basis64, A) and not torch.allclose(Simulation(1).basis64, A)
    f1 = sim.objective("f1-theta2")
    best = 3.0 * sim.theta2.float()[None]                                 # θᵀx = 3 -> f1 = 10
    assert abs(float(f1(best)) - 10.0) < 1e-4 and f1.optimum == 10.0
    f2 = sim.objective("f2-b1")
    assert abs(float(f2(sim.b1.float()[None])) - 5.0) < 1e-5
    with pytest.raises(ValueError, match="objective"):
        sim.objective("f3")


def _run(sim, model, guidance, **kw):
    kw.setdefault("rounds", 6)
    kw.setdefault("steps", 20)
    kw.setdefault("batch_size", 16)
    return optimize(model, sim.objective("f1-theta2"), dim=sim.D, schedule=sim.schedule,
                    delta=kw.pop("delta", 0.3), guidance=guidance, basis=sim.basis, seed=1234, progress=False, **kw)


def test_algorithm1_exact_score_raises_reward_and_g_loss_stays_on_support(sim, exact):
    res_loss = _run(sim, exact, "G_loss")
    res_g = _run(sim, exact, "G")
    rewards = [r.reward_mean for r in res_loss.log]
    assert len(res_loss.log) == 7 and res_loss.stopped is None
    assert rewards[-1] > rewards[0] + 0.5                      # the reward rises over rounds
    assert sum(b > a for a, b in zip(rewards, rewards[1:])) >= 4
    assert max(r.r_off_mean for r in res_loss.log) < 1e-4    # Theorem 1: G_loss stays in span(A)
    assert res_g.final.r_off_mean > 100 * max(res_loss.final.r_off_mean, 1e-6)  # G leaves it
    assert res_g.final.reward_mean > res_g.log[0].reward_mean
    for r in res_loss.log:
        assert r.reward_top4 >= r.reward_mean and r.seconds > 0


def test_mean_query_and_explicit_gradients(sim, exact):
    obj = sim.objective("f1-theta2")

    def reward_grad(x):  # explicit gradient of f1: −2 (θᵀx − 3) θ
        theta = sim.theta2.to(x)
        return obj(x), -2 * ((x @ theta) - 3.0)[:, None] * theta[None]
    auto = _run(sim, exact, "G_loss", rounds=3)
    explicit = optimize(exact, reward_grad=reward_grad, dim=sim.D, schedule=sim.schedule, rounds=3, delta=0.3,
                        guidance="G_loss", basis=sim.basis, seed=1234, progress=False, steps=20, batch_size=16)
    for a, b in zip(auto.log, explicit.log):
        assert math.isclose(a.reward_mean, b.reward_mean, rel_tol=1e-4, abs_tol=1e-5)
    mean = _run(sim, exact, "G_loss", query="mean")
    assert mean.settings["query"] == "mean"
    assert mean.final.reward_mean > mean.log[0].reward_mean + 0.3
    assert mean.final.r_off_mean < 1e-4


def _flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()]).clone()


@pytest.mark.parametrize("mode", ["per-round", "history"])
def test_finetuning_changes_weights_only_from_k_ft(sim, mode):
    torch.manual_seed(0)
    net = SmallScoreNet(sim.D, hidden=32, depth=2, alphas_cumprod=sim.schedule.alphas_cumprod).eval()
    before = _flat(net)
    seen = {}
    res = _run(sim, net, "G_loss", algorithm=2, rounds=5, steps=5, k_ft=2, ft_lr=1e-3, finetune=mode,
               callback=lambda log, z: seen.__setitem__(log.round, _flat(net)))
    # round k+1's batch is drawn after the fine-tuning step of loop index k (authors' order)
    assert [r.finetuned for r in res.log] == [False, False, False, True, True, True]
    assert torch.equal(seen[0], before) and torch.equal(seen[1], before) and torch.equal(seen[2], before)
    assert not torch.equal(seen[3], before) and not torch.equal(seen[4], seen[3])
    assert all(r.ft_loss is not None and math.isfinite(r.ft_loss) for r in res.log if r.finetuned)
    assert not net.training                                    # back in eval mode for sampling
    assert all(p.requires_grad for p in net.parameters())      # untouched for the caller
    alg1 = _run(sim, net, "G_loss", algorithm=1, rounds=2, steps=5)
    assert all(not r.finetuned for r in alg1.log)


def test_algorithm2_needs_a_module(sim, exact):
    with pytest.raises(TypeError, match="algorithm=2.*nn.Module"):
        _run(sim, exact, "G_loss", algorithm=2)


def test_wrong_reward_shape_is_a_clear_error(sim, exact):
    with pytest.raises(ValueError, match=r"reward: expected one value per sample, shape \[B\] = \[16\], got \(16, 1\)"):
        optimize(exact, lambda x: x.sum(1, keepdim=True), dim=sim.D, schedule=sim.schedule, rounds=2, delta=0.1,
                 batch_size=16, steps=5, progress=False)
    with pytest.raises(ValueError, match="reward_grad gradients: expected shape"):
        optimize(exact, reward_grad=lambda x: (x.sum(1), x[:, :3]), dim=sim.D, schedule=sim.schedule, rounds=2,
                 delta=0.1, batch_size=16, steps=5, progress=False)
    with pytest.raises(ValueError, match="exactly one of reward"):
        optimize(exact, dim=sim.D, schedule=sim.schedule, rounds=2, delta=0.1)
    with pytest.raises(ValueError, match="guidance"):
        optimize(exact, lambda x: x.sum(1), dim=sim.D, schedule=sim.schedule, rounds=2, delta=0.1, guidance="G2")


def test_nan_reward_mid_run_stops_cleanly_and_keeps_the_log(sim, exact):
    obj = sim.objective("f1-theta2")
    calls = {"n": 0}

    def reward(x):
        calls["n"] += 1
        v = obj(x)
        return v * float("nan") if calls["n"] == 4 else v
    res = optimize(exact, reward, dim=sim.D, schedule=sim.schedule, rounds=10, delta=0.3, guidance="G",
                   basis=sim.basis, batch_size=8, steps=5, seed=0, progress=False)
    assert res.stopped is not None and "non-finite reward" in res.stopped and "round 3" in res.stopped
    assert [r.round for r in res.log] == [0, 1, 2]
    assert all(math.isfinite(r.reward_mean) for r in res.log) and torch.isfinite(res.samples).all()
    d = res.to_dict()
    assert d["rounds_completed"] == 2 and len(d["log"]) == 3 and d["stopped"] == res.stopped


def test_shipped_small_network(sim):
    net = load_small()
    assert count_parameters(net) < 100_000 and net.info["epochs"] == 40
    x0 = sim.sample_data(1024, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        loss = float(diffusion_loss(net, x0, sim.schedule, torch.Generator().manual_seed(6)))
    assert loss < 0.2                       # trained (an untrained network scores ≈ 1 or worse)
    from gradguide import sample
    with torch.no_grad():
        x = sample(net, (128, sim.D), schedule=sim.schedule, steps=25, generator=torch.Generator().manual_seed(0))
    assert float(sim.r_off(x).mean()) < 0.1 and 3.0 < float(x.norm(dim=1).mean()) < 4.8  # data norm ≈ 3.9


def test_paper_unet_shape_and_size():
    assert abs(count_parameters(UNet1D(64)) - 14.9e6) < 0.1e6   # the paper's size at width 64
    net = UNet1D(64, width=16)                                 # same code path, cheaper forward
    with torch.no_grad():
        out = net(torch.randn(3, 64), torch.tensor([0, 57, 199]))
    assert out.shape == (3, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="UNet1D: x"):
        net(torch.randn(3, 32), torch.tensor([0, 1, 2]))


def test_demo_json(tmp_path):
    from gradguide.experiments import demo_optimize
    path = tmp_path / "demo.json"
    lines = []
    runs = demo_optimize.run(rounds=4, steps=5, plot=str(tmp_path / "demo.png"), json_path=str(path),
                             progress=False, out=lines.append)
    data = json.loads(path.read_text())
    assert len(data["runs"]) == 4 and len(runs) == 4
    assert {(r["algorithm"], r["guidance"]) for r in data["runs"]} == {(1, "G"), (1, "G_loss"), (2, "G"),
                                                                          (2, "G_loss")}
    for r in data["runs"]:
        assert r["objective"] == "f1-theta2" and r["rounds"] == (4 if r["algorithm"] == 1 else 5)
        assert math.isfinite(r["final_reward"]) and math.isfinite(r["final_r_off"])
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert any("Alg. 2" in line for line in lines)


@pytest.mark.parametrize("algorithm", [1, 2])
def test_graph_replay_across_rounds_equals_eager(sim, algorithm):
    """Rounds share one GraphCache: captured once per structure, later rounds load their new
    gradients/targets, and Algorithm 2's in-place fine-tuning is seen by the replays (emulated
    capture on CPU runs exactly the CUDA bookkeeping)."""
    from gradguide.graphs import GraphCache

    def run(graph):
        torch.manual_seed(0)
        net = SmallScoreNet(sim.D, hidden=32, depth=2, alphas_cumprod=sim.schedule.alphas_cumprod).eval()
        return _run(sim, net, "G_loss", algorithm=algorithm, rounds=4, steps=5, k_ft=1, ft_lr=1e-3, graph=graph)

    cache = GraphCache(emulate=True)
    eager, graphed = run(False), run(cache)
    assert [r.reward_mean for r in eager.log] == [r.reward_mean for r in graphed.log]
    assert [r.r_off_mean for r in eager.log] == [r.r_off_mean for r in graphed.log]
    assert cache.reuses == 3            # the unguided z_0 pass and the first guided round capture
    with pytest.warns(UserWarning, match="graph=True needs a CUDA device"):
        run(True)
