"""The federation's optimisation settings (issue 14): FedProx, the local step budget, the lr schedule across rounds,
a fresh local optimiser per round, and Flower's FedAdam / FedYogi as the server's step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from momkd_fed.config import Config, config_from_dict
from momkd_fed.engine import make_optimizer, train_epoch
from momkd_fed.errors import CheckpointError, ConfigError
from momkd_fed.federation.aggregate import FedAvgMState, SharedUpdate, aggregate_shared
from momkd_fed.federation.proximal import ProximalTerm
from momkd_fed.federation.schedule import round_lr

from tests.test_engine import fresh_model, make_bags, tiny_cfg
from tests.test_federation_maths import flower_train_replies


# ---- FedProx -------------------------------------------------------------------------------------------------------
def test_proximal_term_value_and_gradient():
    """value = mu/2 * sum ||w - w_ref||^2 over the named parameters; add_grad adds exactly its autograd gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ref = {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}
    ref.pop("1.bias")  # not sent: not in the term
    ref["not_a_param"] = torch.ones(2)  # ignored
    mu = 0.7
    prox = ProximalTerm(model, ref, mu)
    params = dict(model.named_parameters())
    expect = 0.5 * mu * sum(((params[k] - ref[k]) ** 2).sum() for k in ("0.weight", "0.bias", "1.weight"))
    assert float(prox.value().detach()) == pytest.approx(float(expect), rel=1e-6)
    # autograd of the value
    prox.value().backward()
    auto = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    assert set(auto) == {"0.weight", "0.bias", "1.weight"}
    for k, g in auto.items():
        torch.testing.assert_close(g, mu * (params[k].detach() - ref[k]))
    # add_grad on top of a loss gradient == the loss's gradient + the term's
    model.zero_grad(set_to_none=True)
    x = torch.randn(5, 4)
    model(x).sum().backward()
    loss_grad = {k: p.grad.clone() for k, p in params.items()}
    prox.add_grad()
    for k, p in params.items():
        torch.testing.assert_close(p.grad, loss_grad[k] + auto.get(k, torch.zeros_like(p)))
    # a parameter the loss did not reach keeps no gradient; mu = 0 adds nothing
    model.zero_grad(set_to_none=True)
    prox.add_grad()
    assert all(p.grad is None for p in model.parameters())
    model(x).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    ProximalTerm(model, ref, 0.0).add_grad()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    with pytest.raises(ValueError):
        ProximalTerm(model, ref, -1.0)


def test_prox_holds_the_local_model_near_the_global_one():
    """With a large mu the weights move less from the round's start than without (same seed, same slides)."""
    cfg = tiny_cfg()
    bags = make_bags(12)

    def drift(mu: float) -> float:
        model = fresh_model(cfg)
        start = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("histology_encoder.")}
        prox = ProximalTerm(model, start, mu) if mu else None
        opt = make_optimizer(model, cfg.train)
        train_epoch(model, bags, opt, cfg, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                    after_backward=prox.add_grad if prox else None)
        return sum(float((model.state_dict()[k] - v).pow(2).sum()) for k, v in start.items())

    free, held = drift(0.0), drift(50.0)
    assert held < 0.5 * free


# ---- step budget -----------------------------------------------------------------------------------------------------
def test_train_epoch_max_steps_and_after_backward_before_clipping():
    cfg = tiny_cfg(grad_clip=1.0)
    bags = make_bags(12)
    model = fresh_model(cfg)
    opt = make_optimizer(model, cfg.train)
    norms = []

    def blow_up():  # runs before clipping: huge gradients are still clipped to grad_clip
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(1e6)
        norms.append(1)

    real_step = opt.step
    clipped = []

    def step(*a, **k):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        clipped.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(*a, **k)

    opt.step = step
    out = train_epoch(model, bags, opt, cfg, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                      after_backward=blow_up, max_steps=5)
    assert out["num_slides"] == 5.0 and len(norms) == 5 and len(clipped) == 5
    assert max(clipped) <= 1.0 + 1e-4
    # the budget only truncates the epoch's order: its slides are the first 5 of the whole epoch's
    seen = {}
    for steps in (5, None):
        m = fresh_model(cfg)
        ids = seen.setdefault(steps, [])
        train_epoch(m, bags, make_optimizer(m, cfg.train), cfg, generator=torch.Generator().manual_seed(1),
                    device=torch.device("cpu"), max_steps=steps, on_step=lambda bag, out, ids=ids: ids.append(bag.slide_id))
    assert len(seen[None]) == 12 and seen[5] == seen[None][:5]
    n = train_epoch(fresh_model(cfg), bags, make_optimizer(fresh_model(cfg), cfg.train), cfg,
                    generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), max_steps=100)
    assert n["num_slides"] == 12.0  # a budget beyond the epoch: the whole epoch


# ---- lr schedule -----------------------------------------------------------------------------------------------------
def test_round_lr_constant_and_cosine():
    cfg = config_from_dict({"train": {"lr": 1e-3}, "federation": {"rounds": 5}})
    assert [round_lr(cfg, r) for r in (1, 3, 5, 9)] == [1e-3] * 4
    cfg = config_from_dict({"train": {"lr": 1e-3}, "federation": {"rounds": 5, "lr_schedule": "cosine",
                                                                  "lr_final_factor": 0.1}})
    lrs = [round_lr(cfg, r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert lrs[2] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: the mean of the two ends
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert round_lr(cfg, 12) == pytest.approx(1e-4)  # past the last round: the last value
    one = config_from_dict({"train": {"lr": 1e-3}, "federation": {"rounds": 1, "lr_schedule": "cosine"}})
    assert round_lr(one, 1) == 1e-3


@pytest.mark.parametrize("bad", [{"local_steps": -1}, {"lr_final_factor": 0.0}, {"lr_final_factor": 1.5},
                                 {"prox_mu": -0.1}, {"server_beta1": 1.0}, {"server_tau": 0.0},
                                 {"server_optimizer": "fedsgd"}])
def test_federation_optimisation_settings_are_checked(bad):
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"federation.{key}"):
        config_from_dict({"federation": bad})


# ---- server optimisers (Flower's FedAdam / FedYogi) -----------------------------------------------------------------
def _t(d):
    return {k: torch.from_numpy(np.array(v)) for k, v in d.items()}


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_server_optimizer_matches_flower_strategy(kind):
    """Three rounds: our average + FlowerServerOpt == Flower's own FedAdam / FedYogi aggregate_train on the same
    replies; a checkpointed optimiser continues exactly (resume)."""
    from flwr.serverapp.strategy import FedAdam, FedYogi

    from server.server_opt import FlowerServerOpt, server_optimizer

    rng = np.random.default_rng(3)
    glob = {"x": rng.normal(size=(4, 2)).astype(np.float32), "y": rng.normal(size=(3,)).astype(np.float32)}
    settings = dict(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2)
    flower = {"fedadam": FedAdam, "fedyogi": FedYogi}[kind](**settings)
    ours = FlowerServerOpt(kind, settings["eta"], settings["beta_1"], settings["beta_2"], settings["tau"])
    w_flower = {k: v.copy() for k, v in glob.items()}
    w = _t(glob)
    for rnd in (1, 2, 3):
        if rnd == 2:  # checkpoint and restore between rounds: identical continuation
            cfg = config_from_dict({"federation": {"server_optimizer": kind, "server_lr": settings["eta"],
                                                   "server_beta1": settings["beta_1"],
                                                   "server_beta2": settings["beta_2"],
                                                   "server_tau": settings["tau"]}})
            ours = server_optimizer(cfg, ours.state_dict())
        flower.current_arrays = {k: v.copy() for k, v in w_flower.items()}
        sites = [({k: (v + rng.normal(size=v.shape, scale=0.2)).astype(np.float32) for k, v in w_flower.items()}, n)
                 for n in (3, 9, 5)]
        msgs = flower_train_replies(sites, rnd)
        rec, _ = flower.aggregate_train(rnd, msgs)
        w_flower = {k: rec[k].numpy() for k in glob}
        avg = aggregate_shared(w, [SharedUpdate(str(i), _t(a), n, False) for i, (a, n) in enumerate(sites)], [])
        w = ours.step(w, avg.weights, avg.frozen, server_round=rnd)
        for k in glob:
            np.testing.assert_allclose(w[k].numpy(), w_flower[k], rtol=1e-5, atol=1e-6)
            assert not np.allclose(w[k].numpy(), avg.weights[k].numpy())  # it is not plain FedAvg


def test_server_optimizer_frozen_keys_and_kind_checks():
    from server.server_opt import FlowerServerOpt, server_optimizer

    opt = FlowerServerOpt("fedadam", 0.1, 0.9, 0.99, 1e-3)
    w = _t({"a": np.zeros(3, np.float32), "g": np.ones(2, np.float32), "n": np.array(4, np.int64)})
    avg = _t({"a": np.full(3, 0.5, np.float32), "g": np.full(2, 2.0, np.float32), "n": np.array(9, np.int64)})
    w1 = opt.step(w, avg, frozen=[], server_round=1)
    m_g = opt.opt.m_t["g"].copy()
    w2 = opt.step(w1, avg, frozen=["g"], server_round=2)
    assert torch.equal(w2["g"], w1["g"]) and np.array_equal(opt.opt.m_t["g"], m_g)  # frozen: weight and moment kept
    assert not torch.equal(w2["a"], w1["a"]) and int(w2["n"]) == 4  # integer keys keep the global value
    # the default is FedAvgM; a checkpoint of another kind is refused with the fix
    assert isinstance(server_optimizer(Config()), FedAvgMState)
    assert isinstance(server_optimizer(Config(), FedAvgMState(1.0, 0.0).state_dict()), FedAvgMState)
    assert isinstance(server_optimizer(Config(), {"server_lr": 1.0, "server_momentum": 0.0}), FedAvgMState)
    cfg = config_from_dict({"federation": {"server_optimizer": "fedyogi"}})
    with pytest.raises(CheckpointError, match="server_optimizer"):
        server_optimizer(cfg, FedAvgMState(1.0, 0.0).state_dict())
    assert math.isfinite(float(w2["a"][0]))


# ---- in a federation (the real ClientApp and server loop, in process) -------------------------------------------
from tests.test_flower_inprocess import InProcessGrid, _run_config, tiny  # noqa: E402,F401  (fixture)

OPTIMISED = {"federation.server_optimizer": "fedadam", "federation.server_lr": 0.01,
             "federation.lr_schedule": "cosine", "federation.prox_mu": 0.1, "federation.local_steps": 4,
             "federation.reset_optimizer": True}


class _Stop(Exception):
    """The coordinator was stopped."""


class StoppingGrid(InProcessGrid):
    """Stops the coordinator (raises) when it sends the train messages of ``stop_round``."""

    def __init__(self, *a, stop_round: int, **k) -> None:
        super().__init__(*a, **k)
        self.stop_round = stop_round

    def send_and_receive(self, messages, *, timeout=None):
        from momkd_fed.federation import contract

        messages = list(messages)
        for m in messages:
            cfg = m.content.config_records.get(contract.CONFIG_RECORD, {})
            if m.metadata.message_type == "train" and cfg.get(contract.CFG_ROUND) == self.stop_round:
                raise _Stop(f"stopped before round {self.stop_round}")
        return super().send_and_receive(messages, timeout=timeout)


def test_resume_equals_uninterrupted_with_every_optimisation_setting(tiny, tmp_path):
    """FedAdam moments, the cosine lr, FedProx, the step budget and fresh local optimisers: stop after round 1,
    resume to round 2 == two rounds without stopping."""
    import json

    from client.run_config import split_run_config
    from server import run_outputs
    from server.rounds import run_federation
    from server.server_opt import FlowerServerOpt

    full, part = tmp_path / "full", tmp_path / "part"
    rc = _run_config(tiny, full, rounds=2, **OPTIMISED)
    cfg, opts = split_run_config(rc)
    run_federation(InProcessGrid(rc, 3), cfg, opts)
    rc1 = _run_config(tiny, part, rounds=2, **OPTIMISED)  # same plan (the lr schedule depends on it), stopped
    with pytest.raises(_Stop):
        run_federation(StoppingGrid(rc1, 3, stop_round=2), *split_run_config(rc1))
    rc2 = _run_config(tiny, part, rounds=2, resume=True, **OPTIMISED)
    cfg2, opts2 = split_run_config(rc2)
    assert run_federation(InProcessGrid(rc2, 3), cfg2, opts2)["rounds_completed"] == 2
    a, b = run_outputs.load_latest(full, cfg), run_outputs.load_latest(part, cfg2)
    assert isinstance(a.momentum, FlowerServerOpt) and a.momentum.opt.v_t
    for k in a.shared:
        assert torch.allclose(a.shared[k], b.shared[k], atol=1e-6, rtol=0), k
    for k in a.momentum.opt.m_t:
        np.testing.assert_allclose(a.momentum.opt.m_t[k], b.momentum.opt.m_t[k], atol=1e-7)
        np.testing.assert_allclose(a.momentum.opt.v_t[k], b.momentum.opt.v_t[k], atol=1e-9)
    assert torch.allclose(a.slots, b.slots, atol=1e-6, rtol=0)
    rows = [json.loads(line) for line in (full / "rounds.jsonl").read_text().splitlines()]
    # the step budget: 4 slides per site per round; the averaging weight is the site's training slides
    for r in rows:
        for site, m in r["train"].items():
            assert m["num-examples"] == len(_train_slides(cfg, site))


def _train_slides(cfg, site):
    from momkd_fed.data.site import load_site

    return load_site(cfg.site(site), cfg).split("train")


def test_site_optimizer_steps_follow_the_budget_and_the_reset(tiny, tmp_path):
    """The site's saved AdamW state counts its steps: 4 per round with the budget; reset -> 4, kept -> 8 after 2."""
    from client.run_config import split_run_config
    from client.site_state import load_site_state
    from server.rounds import run_federation

    steps = {}
    for reset in (True, False):
        out = tmp_path / str(reset)
        rc = _run_config(tiny, out, rounds=2, **{"federation.local_steps": 4, "federation.reset_optimizer": reset})
        run_federation(InProcessGrid(rc, 3), *split_run_config(rc))
        state_dir = next((out / "site_state" / "hospital_a").iterdir())
        st = load_site_state(state_dir, 3)
        steps[reset] = {float(s["step"]) for s in st.optimizer["state"].values()}
    assert steps == {True: {4.0}, False: {8.0}}


def test_a_budget_above_a_sites_slides_is_met_epoch_after_epoch(tiny, tmp_path):
    """``local_steps`` is the round's exact step count: a site with fewer training slides goes round its slides
    again (every site's AdamW counts the budget), and its averaging weight stays its training slides."""
    import json

    from client.run_config import split_run_config
    from client.site_state import load_site_state
    from server.rounds import run_federation

    rc0 = _run_config(tiny, tmp_path / "probe", rounds=1)
    cfg0, _ = split_run_config(rc0)
    n_train = {s.name: len(_train_slides(cfg0, s.name)) for s in cfg0.sites}
    budget = 2 * max(n_train.values()) + 1  # more than two epochs at every site
    out = tmp_path / "run"
    rc = _run_config(tiny, out, rounds=1, **{"federation.local_steps": budget})
    cfg, opts = split_run_config(rc)
    run_federation(InProcessGrid(rc, 3), cfg, opts)
    for site in n_train:
        st = load_site_state(next((out / "site_state" / site).iterdir()), 2)
        assert {float(s["step"]) for s in st.optimizer["state"].values()} == {float(budget)}, site
    (row,) = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert {site: m["num-examples"] for site, m in row["train"].items()} == n_train
