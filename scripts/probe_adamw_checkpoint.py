"""Issue 14: AdamW loaded from an Adam checkpoint (decoupled decay forced), stepped once on the
GPU: ours against torch's fused and foreach AdamW loaded from the same checkpoint, with torch's
state after loading (step's device and dtype). Run on the GPU machine:
  python -m scripts.probe_adamw_checkpoint"""
import copy

import torch

from mixprec import optim


def main() -> None:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
    adam = torch.optim.Adam(base.parameters(), lr=0.05, weight_decay=0.5, foreach=True)
    for _ in range(2):
        adam.zero_grad()
        base(torch.ones(4, 16, device="cuda")).square().mean().backward()
        adam.step()
    saved = copy.deepcopy(adam.state_dict())
    saved["param_groups"][0]["decoupled_weight_decay"] = True
    results = {}
    for name, make in [("ours", lambda ps: optim.AdamW(ps)),
                       ("torch-fused", lambda ps: torch.optim.AdamW(ps, fused=True)),
                       ("torch-foreach", lambda ps: torch.optim.AdamW(ps, foreach=True)),
                       ("torch-forloop", lambda ps: torch.optim.AdamW(ps, foreach=False))]:
        model = copy.deepcopy(base)
        opt = make(list(model.parameters()))
        opt.load_state_dict(copy.deepcopy(saved))
        state = next(iter(opt.state.values()))
        print(f"{name:14} group: { {k: v for k, v in opt.param_groups[0].items() if k != 'params'} }")
        print(f"{'':14} step {state['step']!r} device {state['step'].device} dtype {state['step'].dtype}")
        model.zero_grad()
        model(torch.ones(4, 16, device="cuda")).square().mean().backward()
        opt.step()
        results[name] = [p.detach().clone() for p in model.parameters()]
    for name, params in results.items():
        rel = max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(params, results["torch-forloop"]))
        print(f"{name:14} max relative difference from torch's for-loop AdamW: {rel:.3g}")


if __name__ == "__main__":
    main()
