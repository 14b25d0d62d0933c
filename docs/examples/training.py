"""Fit a per-atom MLP on centred coordinates (not equivariant by construction) to xTB ethanol energies and forces,
with and without a Lie-derivative penalty, and watch its equivariance with the monitor."""
import torch

import geolie
from geolie.losses import lie_penalty
from geolie.monitor import EquivarianceMonitor

train = geolie.data.load("xtb-md/ethanol", "train")[:8]
held_out = geolie.data.load("xtb-md/ethanol", "val")  # the monitor measures 16 of them (max_samples)


class CentredMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(9, 16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(19, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1))

    def forward(self, z, pos, batch):
        centred = pos - torch.zeros(int(batch.max()) + 1, 3, dtype=pos.dtype).index_add(0, batch, pos)[batch] \
            / torch.bincount(batch).to(pos.dtype)[batch, None]
        e = self.mlp(torch.cat([self.embed(z), centred], dim=-1)).squeeze(-1)
        return torch.zeros(int(batch.max()) + 1, dtype=pos.dtype).index_add(0, batch, e)


def fit(lam, out_dir):
    torch.manual_seed(0)
    model = CentredMLP().double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    monitor = EquivarianceMonitor(model, held_out, out_dir, every=15, group="SO3", n_finite=1, resume=False)
    z = [torch.as_tensor(a.numbers) for a in train]
    pos = [torch.as_tensor(a.positions) for a in train]
    e_ref = torch.tensor([a.get_potential_energy() for a in train])
    e_ref = e_ref - e_ref.mean()
    gen = torch.Generator().manual_seed(0)
    for step in range(31):
        batch = torch.cat([torch.full((len(x),), k) for k, x in enumerate(z)])
        zz, pp = torch.cat(z), torch.cat(pos)
        energy = lambda p: model(zz, p, batch)  # noqa: E731
        loss = ((energy(pp) - energy(pp).mean() - e_ref) ** 2).mean()
        if lam:
            loss = loss + lam * lie_penalty(energy, pp, group="SO3", relative=True, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows = monitor.step(step)
        if rows:
            r = rows[0]
            print(f"lam={lam:<4} step {step:>2}: energy rot. Lie derivative (median over {r['n_samples']} held-out "
                  f"structures) {r['rot_iso_median']:.1e}, verdict {r['verdict']}")
    return monitor


fit(0, "monitor-plain")
fit(300, "monitor-penalty")
