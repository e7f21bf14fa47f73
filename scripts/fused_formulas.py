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
