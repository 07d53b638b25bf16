"""docs/REPAIR.md, "Which variant, and why": one layer's calibration loss (paper objective, batches
of 8 sequences, builtin:python-prose 128 x 256) after merging its dropped experts by several
variants, written here from scratch (no moe_fast merge code), layer-wise (the unpruned block's inputs).

    OMP_NUM_THREADS=1 python benchmarks/merge_variants.py builtin:small-mixtral 1,3,5,6 0
    OMP_NUM_THREADS=1 python benchmarks/merge_variants.py builtin:small-mixtral 0,1,5,7 5

(KEPT: the layer's exact selection, from a run's report.) The Hungarian alignment needs scipy.
Mixtral-style routers (softmax, top-k, renormalized unless ``norm_topk_prob`` is false).
"""
import math, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from moe_fast.models import resolve_model
from moe_fast.data.calibration import load_calibration
torch.set_grad_enabled(False)
path = resolve_model(sys.argv[1]); kept = [int(v) for v in sys.argv[2].split(",")]; layer = int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(path)
ids = load_calibration("builtin:python-prose", tok, 128, 256, 42)
block = model.model.layers[layer].mlp
seen = {}
h = block.register_forward_hook(lambda m, a, o: seen.update(x=a[0], z=o[0] if isinstance(o, tuple) else o))
xs, zs = [], []
for i in range(0, 128, 8):
    model.model(ids[i:i+8]); xs.append(seen["x"].reshape(-1, seen["x"].shape[-1]).double()); zs.append(seen["z"].reshape(-1, seen["z"].shape[-1]).double())
h.remove()
x, z = torch.cat(xs), torch.cat(zs)
gate = block.gate
W = gate.weight.double(); k = gate.top_k; E = W.shape[0]
renorm = getattr(gate, "norm_topk_prob", True)
gu = block.experts.gate_up_proj.double(); dn = block.experts.down_proj.double(); I = gu.shape[1] // 2
def out(g, d, xx): return (torch.nn.functional.silu(xx @ g[:I].T) * (xx @ g[I:].T)) @ d.T
def route(WW, xx, keep=None):
    l = xx @ WW.T
    if keep is not None: l[:, [e for e in range(E) if e not in keep]] = -math.inf
    top, idx = torch.topk(torch.softmax(l, -1), k, -1)
    if renorm: top = top / top.sum(-1, keepdim=True)
    return torch.zeros_like(l).scatter(1, idx, top)
def loss(G, D, WW):
    w = route(WW, x, kept)
    y = sum(w[:, e:e+1] * out(G[e], D[e], x) for e in kept)
    per = ((z - y) ** 2).sum(-1).view(-1, 256).sum(-1)
    return float(sum(per[i:i+8].sum().sqrt() for i in range(0, 128, 8)))
w = route(W, x); mass = w.sum(0)
outs = [out(gu[e], dn[e], x) for e in range(E)]
dropped = [e for e in range(E) if e not in kept]
cos = {}
for d in dropped:
    wd = w[:, d]
    for c in kept:
        cos[d, c] = float((wd * (outs[d] * outs[c]).sum(-1)).sum() / ((wd * (outs[d]**2).sum(-1)).sum() * (wd * (outs[c]**2).sum(-1)).sum()).sqrt())
assign = {d: max(kept, key=lambda c: cos[d, c]) for d in dropped}
# assignment by router-row cosine (HC-SMoE-like alternative) and by weight distance
assign_w = {d: max(kept, key=lambda c: float(torch.cosine_similarity(torch.cat([gu[d].flatten(), dn[d].flatten()]), torch.cat([gu[c].flatten(), dn[c].flatten()]), 0))) for d in dropped}
def align(c, d):
    """permute d's hidden units to c's: Hungarian on the cosine of [gate row, up row, down column]."""
    fc = torch.cat([gu[c][:I], gu[c][I:], dn[c].T], 1); fd = torch.cat([gu[d][:I], gu[d][I:], dn[d].T], 1)
    sim = torch.nn.functional.normalize(fc, dim=1) @ torch.nn.functional.normalize(fd, dim=1).T
    from scipy.optimize import linear_sum_assignment

    r, p = linear_sum_assignment(-sim.numpy())
    perm = torch.as_tensor(p)
    return torch.cat([gu[d][:I][perm], gu[d][I:][perm]]), dn[d][:, perm]
def align_greedy(c, d):
    fc = torch.cat([gu[c][:I], gu[c][I:], dn[c].T], 1); fd = torch.cat([gu[d][:I], gu[d][I:], dn[d].T], 1)
    sim = torch.nn.functional.normalize(fc, dim=1) @ torch.nn.functional.normalize(fd, dim=1).T
    order = torch.argsort(sim.flatten(), descending=True)
    perm = torch.full((I,), -1, dtype=torch.long); used = torch.zeros(I, dtype=torch.bool)
    for f in order.tolist():
        i, j = divmod(f, I)
        if perm[i] < 0 and not used[j]:
            perm[i] = j; used[j] = True
    return torch.cat([gu[d][:I][perm], gu[d][I:][perm]]), dn[d][:, perm]
def merged(s, assignment, weighting="mass", aligned=False, router=False):
    G, D, WW = gu.clone(), dn.clone(), W.clone()
    for c in kept:
        ds = [d for d in dropped if assignment[d] == c]
        if not ds: continue
        m = (lambda e: float(mass[e])) if weighting == "mass" else (lambda e: 1.0)
        tot = m(c) + s * sum(m(d) for d in ds)
        g, dd, r = m(c) * gu[c], m(c) * dn[c], m(c) * W[c]
        for d in ds:
            gd, ddd = (align_greedy(c, d) if aligned == "greedy" else align(c, d)) if aligned else (gu[d], dn[d])
            g = g + s * m(d) * gd; dd = dd + s * m(d) * ddd; r = r + s * m(d) * W[d]
        G[c], D[c] = g / tot, dd / tot
        if router: WW[c] = r / tot
    return G, D, WW
base = loss(gu, dn, W)
print(f"pruned: {base:.1f}; mass {[round(float(v)) for v in mass]}; into {assign}; by weights {assign_w}")
S = (0.0625, 0.125, 0.25, 0.5, 1.0)
for name, kw in [("mass, output cosine", dict()), ("uniform", dict(weighting="uniform")),
                 ("mass, aligned", dict(aligned=True)), ("mass, aligned greedy", dict(aligned="greedy")),
                 ("mass, router rows averaged", dict(router=True)),
                 ("mass, weight-cosine assignment", dict(assignment=assign_w)),
                 ("mass, weight-cosine, aligned", dict(assignment=assign_w, aligned=True))]:
    a = kw.pop("assignment", assign)
    vals = {s: loss(*merged(s, a, **kw)) for s in S}
    best = min(vals, key=vals.get)
    print(f"{name:34s} " + " ".join(f"{s}:{v:.1f}" for s, v in vals.items()) + f"  best {best}: {100*(vals[best]-base)/base:+.1f}%")
