"""A design probe, kept so its result can be reproduced: AdaptOpt's step split into torch's own fused AdamW
for the update and one compiled pass for the statistics. Measured slower than the shipped single pass, so
it is not used (docs/performance.md, "torch's fused AdamW plus a statistics pass").

    HF_HUB_OFFLINE=1 python benchmarks/split_step_probe.py 1      # threads; add "check" to stop after the check

The split: one torch.compile-d pass over (g, m, v) gives [g.u, g.g, u.u] (g.g is also the clipping
norm, so no _foreach_norm pass), then torch._fused_adamw_ updates p, m, v with the clipping factor as its
grad_scale, AdaptOpt's bias correction folded into its lr and the decoupled decay into its weight_decay.
It first checks that this gives AdaptOpt's fused step (5 steps, with its adaptive parts and clipping),
then times both, torch's fused AdamW and DeepSpeedCPUAdam round-robin on all-MiniLM-L6-v2's parameters.
"""
import math, sys, time, statistics, torch
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks")
import adaptopt.optim as O
from adaptopt import AdaptOpt
from adaptopt import functional as F
from optimizer_step import load_weights, HYPER
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
torch.manual_seed(0)
W = load_weights(None)
G = [torch.randn_like(w) * 1e-3 for w in W]

def _stats(g, m, v, sc):
    inv_bc1_prev, inv_bc2_prev_sqrt, eps = sc.unbind()
    u = m * inv_bc1_prev / (v.sqrt() * inv_bc2_prev_sqrt + eps)
    return [(g * u).sum(dtype=torch.float32), (g * g).sum(dtype=torch.float32), (u * u).sum(dtype=torch.float32)]
def _stats_kernel(gs, ms, vs, sc):
    out = []
    for i in range(len(gs)):
        out += _stats(gs[i], ms[i], vs[i], sc)
    return out
kern = torch.compile(_stats_kernel, dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True})

def stats_pass(grads, ms, vs, s, eps):
    sc = torch.tensor([1 / s.bias_correction1_prev, 1 / s.bias_correction2_prev_sqrt, eps])
    big = [i for i, g in enumerate(grads) if g.numel() > F._SMALL_NUMEL]
    small = [i for i, g in enumerate(grads) if g.numel() <= F._SMALL_NUMEL]
    items = [(F._flat(grads[i], False), F._flat(ms[i]), F._flat(vs[i])) for i in big]
    if small:
        items.append(tuple(torch.cat([t[i].reshape(-1) for i in small]) for t in (grads, ms, vs)))
    dummies = [d[1:] for d in F._dummy_slots(torch.float32, torch.device("cpu"))]
    out = []
    for s0 in range(0, len(items), 8):
        ch = items[s0:s0 + 8]; real = len(ch)
        with F._no_duck_sizing():
            o = kern(*(list(t) for t in zip(*(ch + dummies[:8 - real]))), sc)
        out += o[:3 * real]
    return torch.stack(out).view(-1, 3).to(torch.float64).sum(0)

def fused_update(params, grads, ms, vs, s, beta2, eps, scale, t):
    bc1_f = 1 - s.beta1 ** t
    lr_f = s.step_size * bc1_f
    wd_f = (1 - s.decay) / lr_f if lr_f else 0.0
    steps = [torch.tensor(float(t))] * len(params)
    torch._fused_adamw_(params, grads, ms, vs, [], steps, lr=lr_f, beta1=s.beta1, beta2=beta2, weight_decay=wd_f,
                        eps=eps, amsgrad=False, maximize=False,
                        grad_scale=None if scale == 1.0 else torch.tensor(1.0 / scale), found_inf=None)

def split_impl(params, grads, ms, vs, scalars, *, beta2, eps, want_stats, grad_scale=1.0):
    s = scalars[0]; assert all(x == s for x in scalars)
    t = round(math.log(1 - s.bias_correction2_sqrt ** 2) / math.log(beta2))
    st = stats_pass(grads, ms, vs, s, eps) if want_stats else None
    fused_update(params, grads, ms, vs, s, beta2, eps, grad_scale, t)
    if st is not None:
        st = st * torch.tensor([grad_scale, grad_scale ** 2, 1.0], dtype=torch.float64)
    return st

# correctness: 5 steps, split vs current fused
def run(impl_patch):
    ps = [torch.nn.Parameter(w.clone()) for w in W]
    o = AdaptOpt(ps, fused=True, **HYPER)
    orig = O._pick_impl
    if impl_patch: O._pick_impl = lambda g, p: split_impl
    for k in range(5):
        for p, g in zip(ps, G): p.grad = g * (1 + 0.3 * k) + 1e-4 * torch.sin(p.detach() * (k + 1))
        o.step()
    O._pick_impl = orig
    return ps, o
a, oa = run(False); b, ob = run(True)
d = max(float((x - y).detach().abs().max() / (x - W[i]).detach().abs().max().clamp_min(1e-30)) for i, (x, y) in enumerate(zip(a, b)))
print("max rel diff of the update (5 steps):", d, "lr_scale", oa.param_groups[0]["lr_scale"], ob.param_groups[0]["lr_scale"],
      "cos", oa.param_groups[0]["path_cos"], ob.param_groups[0]["path_cos"])

if len(sys.argv) > 2 and sys.argv[2] == 'check': sys.exit()
# timing: the split step in full (norm from the stats pass, no _foreach_norm)
def newps():
    ps = [torch.nn.Parameter(w.clone()) for w in W]
    for p, g in zip(ps, G): p.grad = g.clone()
    return ps
S = F.TensorScalars(step_size=2e-5 / (1 - 0.9 ** 10), decay=1 - 2e-5 * 0.01, beta1=0.9,
                    bias_correction2_sqrt=(1 - 0.999 ** 10) ** 0.5, bias_correction1_prev=1 - 0.9 ** 9,
                    bias_correction2_prev_sqrt=(1 - 0.999 ** 9) ** 0.5)
fns = {}
def mk(name, fn, ps):
    def restore():
        for p, g in zip(ps, G): p.grad.copy_(g)
    fns[name] = (restore, fn)
ps = newps(); o = AdaptOpt(ps, fused=True, **HYPER); mk("AdaptOpt fused (now)", o.step, ps)
ps2 = newps(); m2 = [torch.randn_like(p) * 1e-4 for p in ps2]; v2 = [torch.rand_like(p) * 1e-6 for p in ps2]
def split_step(ps=ps2):
    gs = [p.grad for p in ps]
    st = stats_pass(gs, m2, v2, S, 1e-8)
    norm = math.sqrt(float(st[1])); c = min(1.0, 1.0 / norm)
    fused_update(ps, gs, m2, v2, S, 0.999, 1e-8, c, 10)
mk("split: stats pass + torch fused", split_step, ps2)
ps3 = newps(); o3 = torch.optim.AdamW(ps3, fused=True, **HYPER); mk("torch AdamW fused", o3.step, ps3)
from deepspeed.ops.adam import DeepSpeedCPUAdam
ps4 = newps(); o4 = DeepSpeedCPUAdam(ps4, adamw_mode=True, **HYPER); mk("DeepSpeedCPUAdam", o4.step, ps4)
ps5 = newps(); gs5 = [p.grad for p in ps5]
mk("  stats pass alone", lambda: stats_pass(gs5, m2, v2, S, 1e-8), ps5)
ps6 = newps(); m6 = [torch.zeros_like(p) for p in ps6]; v6 = [torch.zeros_like(p) for p in ps6]
mk("  torch fused + grad_scale alone", lambda: fused_update(ps6, [p.grad for p in ps6], m6, v6, S, 0.999, 1e-8, 0.2, 10), ps6)
times = {n: [] for n in fns}
for r in range(35):
    for n, (prep, f) in fns.items():
        prep(); t0 = time.perf_counter(); f(); dt = (time.perf_counter() - t0) * 1e3
        if r >= 5: times[n].append(dt)
ds = statistics.median(times["DeepSpeedCPUAdam"])
print(f"threads={torch.get_num_threads()}")
for n, t in times.items():
    q = statistics.quantiles(t, n=4)
    print(f"{n:34} {statistics.median(t):7.1f} ms  {statistics.median(t)/ds:.2f}x DS   (q1-q3 {q[0]:.1f}-{q[2]:.1f})")
