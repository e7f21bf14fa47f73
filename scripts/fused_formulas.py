"""Which per-element roundings torch's fused CUDA SGD and Adam (L2 decay) use: one fused step of
torch's compared with candidate formulas, as the fraction of elements equal bit for bit. Run on
the GPU machine (python -m scripts.fused_formulas); optim_math.h follows the candidate at 1.0.
On the H200 (torch 2.11) our fused_cuda::adam_element (AdamW) matched torch bit for bit while
fmaf(p, wd, g) for Adam's L2 decay and a double fma for SGD did not."""
import torch

torch.manual_seed(0)
n = 1 << 16
dev = "cuda"
p0 = torch.randn(n, device=dev); g = torch.randn(n, device=dev)
d = torch.float64
def fmaf(a, b, c):  # float fma emulated in double (a*b exact in double)
    return (a.to(d) * b.to(d) + c.to(d)).float()
def frac(x, y): return (x.view(torch.int32) == y.view(torch.int32)).float().mean().item()
for lr in (1e-3, 0.1):
    p = p0.clone(); p.grad = g.clone()
    torch.optim.SGD([p], lr=lr, fused=True).step()
    lr_f = torch.tensor(lr, dtype=torch.float32, device=dev)
    cands = {
        "double fma": (p0.to(d) - lr * g.to(d)).float(),
        "float uncontracted": p0 - (lr_f * g),
        "float fma": fmaf(-lr_f, g, p0),
    }
    print("SGD lr", lr, {k: round(frac(p.detach(), v), 5) for k, v in cands.items()})
for mom, damp in ((0.9, 0.0), (0.9, 0.1)):
    p = p0.clone(); p.grad = g.clone(); opt = torch.optim.SGD([p], lr=1e-3, momentum=mom, dampening=damp, fused=True)
    opt.step(); buf1 = opt.state[p]["momentum_buffer"].clone(); g2 = torch.randn(n, device=dev); p.grad = g2.clone(); opt.step()
    b = opt.state[p]["momentum_buffer"]
    m_f = torch.tensor(mom, device=dev); od_f = torch.tensor(1 - damp, device=dev)
    cands = {"double fma(m,b,(1-d)g)": (mom * buf1.to(d) + ((1 - damp) * g2.to(d))).float(),
             "float fma(m,b,(1-d)g)": fmaf(m_f, buf1, od_f * g2), "float fma((1-d),g,m*b)": fmaf(od_f, g2, m_f * buf1),
             "float uncontracted": m_f * buf1 + od_f * g2}
    print("SGD buf", mom, damp, {k: round(frac(b, v), 5) for k, v in cands.items()})
for wd in (0.01, 0.1):
    p = p0.clone(); p.grad = g.clone(); opt = torch.optim.Adam([p], lr=1e-3, betas=(0.0, 0.0), weight_decay=wd, fused=True)
    opt.step(); m = opt.state[p]["exp_avg"]
    wd_f = torch.tensor(wd, device=dev)
    cands = {"fmaf(p,wd,g)": fmaf(p0, wd_f, g), "g + p*wd (float)": g + p0 * wd_f,
             "double": (g.to(d) + p0.to(d) * wd).float()}
    print("Adam L2 wd", wd, {k: round(frac(m, v), 5) for k, v in cands.items()})

# Adam's L2 decay and SGD's weight decay / nesterov: exact candidates (a double fma emulated with
# Fractions on a sample), and the elements where the closest float candidate differs.
from fractions import Fraction


def dfma_to_float(a, b, c):  # float(fma in double): exact a*b + c rounded to double, then float
    out = [float(Fraction(x) * Fraction(y) + Fraction(z)) for x, y, z in zip(a, b, c)]
    return torch.tensor(out, dtype=torch.float64).float()


k = 4096
ps, gs = p0[:k].cpu(), g[:k].cpu()
for wd in (0.01, 0.1):
    p = p0.clone(); p.grad = g.clone()
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.0, 0.0), weight_decay=wd, fused=True)
    opt.step(); m = opt.state[p]["exp_avg"][:k].cpu()
    wd_f = float(torch.tensor(wd))
    cands = {"dfma(p,wd_d,g)": dfma_to_float(ps.tolist(), [wd] * k, gs.tolist()),
             "dfma(p,wd_f,g)": dfma_to_float(ps.tolist(), [wd_f] * k, gs.tolist()),
             "g + float(p*wd_d)": gs + (ps.to(d) * wd).float(),
             "fmaf(p,wd_f,g)": fmaf(ps, torch.tensor(wd_f), gs),
             "fmaf(p,wd_f,g) as float(g+p*wd_f exact)": dfma_to_float(ps.tolist(), [wd_f] * k, gs.tolist())}
    print("Adam L2 exact wd", wd, {n: round(frac(m, v), 5) for n, v in cands.items()})
    bad = (m.view(torch.int32) != cands["fmaf(p,wd_f,g)"].view(torch.int32)).nonzero().flatten()[:4]
    for i in bad.tolist():
        print("  p", ps[i].item(), "g", gs[i].item(), "torch", m[i].item(), "fmaf", cands["fmaf(p,wd_f,g)"][i].item())
for wd, nesterov in ((0.01, False), (0.1, False), (0.0, True)):
    p = p0.clone(); p.grad = g.clone()
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=wd, nesterov=nesterov, fused=True)
    opt.step(); b1 = opt.state[p]["momentum_buffer"].clone(); p1 = p.detach().clone()
    g2 = torch.randn(n, device=dev); p.grad = g2.clone(); opt.step()
    lr_f, m_f, wd_f = (torch.tensor(x, device=dev) for x in (0.1, 0.9, wd))
    gd = fmaf(wd_f, p1, g2) if wd else g2
    b = fmaf(torch.tensor(1.0, device=dev), gd, m_f * b1)
    upd = fmaf(m_f, b, gd) if nesterov else b
    ours = fmaf(-lr_f, upd, p1)
    print("SGD wd", wd, "nesterov", nesterov, "float fma chain:", round(frac(p.detach(), ours), 5),
          "buf:", round(frac(opt.state[p]["momentum_buffer"], b), 5))

# SGD with maximize (momentum) and with a grad scale (no momentum): the cases
# tests/test_optim.py::test_sgd_equals_torch_fused_bit_for_bit found on CUDA (H100, torch 2.11).
lr_f, m_f, one = (torch.tensor(x, device=dev) for x in (1e-3, 0.9, 1.0))
for scale in (None, 1024.0):
    p = p0.clone()
    gs_ = g * scale if scale else g.clone()
    grad_scale = torch.tensor(scale, device=dev) if scale else None
    torch._fused_sgd_([p], [gs_], [], weight_decay=0.0, momentum=0.0, lr=1e-3, dampening=0.0, nesterov=False,
                      maximize=False, is_first_step=False, grad_scale=grad_scale, found_inf=None)
    cands = {"fmaf(-lr,g,p)": fmaf(-lr_f, g, p0), "p - float(lr*g)": p0 - lr_f * g,
             "double": (p0.to(d) - 1e-3 * g.to(d)).float(), "p + float(-lr*g)": p0 + (-lr_f) * g}
    print("SGD momentum 0, grad_scale", scale, {k: round(frac(p, v), 5) for k, v in cands.items()})
for maximize in (False, True):
    p = p0.clone(); bufs = [torch.empty_like(p)]
    torch._fused_sgd_([p], [g.clone()], bufs, weight_decay=0.0, momentum=0.9, lr=1e-3, dampening=0.0, nesterov=False,
                      maximize=maximize, is_first_step=True, grad_scale=None, found_inf=None)
    b1, p1 = bufs[0].clone(), p.clone()
    g2 = torch.randn(n, device=dev)
    torch._fused_sgd_([p], [g2.clone()], bufs, weight_decay=0.0, momentum=0.9, lr=1e-3, dampening=0.0,
                      nesterov=False, maximize=maximize, is_first_step=False, grad_scale=None, found_inf=None)
    gm = -g2 if maximize else g2
    cands = {"fmaf(1,g,m*b)": fmaf(one, gm, m_f * b1), "fmaf(m,b,g)": fmaf(m_f, b1, gm),
             "m*b + g": m_f * b1 + gm, "double": (0.9 * b1.to(d) + gm.to(d)).float()}
    print("SGD buf, maximize", maximize, {k: round(frac(bufs[0], v), 5) for k, v in cands.items()})
    cands = {"fmaf(-lr,b,p)": fmaf(-lr_f, bufs[0], p1), "p - float(lr*b)": p1 - lr_f * bufs[0],
             "double": (p1.to(d) - 1e-3 * bufs[0].to(d)).float()}
    print("SGD param, maximize", maximize, {k: round(frac(p, v), 5) for k, v in cands.items()})
