"""FusedAdamW: torch's fused AdamW update bitwise, torch's state layout both ways, and no torch._dynamo import."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from momkd_fed.optim import FusedAdamW, fused_adamw_supported

pytestmark = pytest.mark.skipif(not fused_adamw_supported([torch.zeros(1)]), reason="no fused CPU AdamW kernel")


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (), (3, 4, 2)]  # a 0-d parameter too (log_tau)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _steps(opt, params, n: int, seed: int, skip: int | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        opt.zero_grad(set_to_none=True)
        for j, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen)
            if j != skip or i % 2 == 0:  # parameter `skip` has no gradient every other step
                p.grad = g
        opt.step()


@pytest.mark.parametrize("lr,wd", [(1e-3, 1e-2), (2e-4, 1e-4), (0.05, 0.0)])
def test_update_is_bitwise_torchs_fused_adamw(lr, wd):
    ours, ref = _params(0), _params(0)
    opt = FusedAdamW(ours, lr=lr, weight_decay=wd)
    ref_opt = torch.optim.AdamW(ref, lr=lr, weight_decay=wd, fused=True)
    _steps(opt, ours, 6, seed=1, skip=1)
    _steps(ref_opt, ref, 6, seed=1, skip=1)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    for a, b in zip(ours, ref):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], ref_opt.state[b][key]), key
    # and the default (foreach) AdamW agrees up to rounding
    plain = _params(0)
    _steps(torch.optim.AdamW(plain, lr=lr, weight_decay=wd), plain, 6, seed=1, skip=1)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_state_dict_round_trips_with_torch_both_ways():
    ref, ours = _params(2), _params(2)
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=1e-2, fused=True)
    _steps(ref_opt, ref, 3, seed=3)
    for a, b in zip(ours, ref):
        a.data.copy_(b.data)
    opt = FusedAdamW(ours, lr=0.5, weight_decay=0.5)
    opt.load_state_dict(ref_opt.state_dict())  # a site state saved by torch's AdamW before this change
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 1e-2
    sd = opt.state_dict()
    assert set(sd["param_groups"][0]) == set(ref_opt.state_dict()["param_groups"][0])  # torch's keys
    _steps(opt, ours, 3, seed=4)
    _steps(ref_opt, ref, 3, seed=4)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    # ours -> torch: the loaded optimiser continues exactly as ours does
    back = _params(5)
    for a, b in zip(back, ours):
        a.data.copy_(b.data)
    torch_opt = torch.optim.AdamW(back, lr=1.0, fused=True)
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as saved to and read from the site's disk
    _steps(opt, ours, 2, seed=6)
    _steps(torch_opt, back, 2, seed=6)
    for a, b in zip(ours, back):
        assert torch.equal(a, b)
    # a loaded state is a copy: stepping one optimiser does not move the other's moments
    twin = FusedAdamW(_params(7), lr=1e-3)
    twin.load_state_dict(opt.state_dict())
    before = {k: v.clone() for k, v in twin.state[twin.param_groups[0]["params"][0]].items()}
    _steps(opt, ours, 1, seed=8)
    after = twin.state[twin.param_groups[0]["params"][0]]
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="parameter groups"):
        FusedAdamW(_params(0)[:2]).load_state_dict(opt.state_dict())


def test_constructing_stepping_and_saving_never_import_dynamo():
    code = ("import sys, torch\nfrom momkd_fed.engine import make_optimizer\nfrom momkd_fed.config import Config\n"
            "m = torch.nn.Linear(4, 3)\nopt = make_optimizer(m, Config().train)\n"
            "m(torch.randn(2, 4)).sum().backward()\ntorch.nn.utils.clip_grad_norm_(list(m.parameters()), 1.0)\n"
            "opt.step(); opt.load_state_dict(opt.state_dict()); opt.zero_grad()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
    # the check can fail: torch's own AdamW does import it
    ref = subprocess.run([sys.executable, "-c", "import sys, torch\ntorch.optim.AdamW(torch.nn.Linear(2, 2)"
                          ".parameters())\nprint('torch._dynamo' in sys.modules)"], capture_output=True, text=True,
                         timeout=300)
    assert ref.stdout.strip() == "True"
