"""Audit your own torch potential: every figure with its floor and a verdict."""
import torch
import geolie


class MyPotential(torch.nn.Module):  # forward(z, pos, batch) -> one energy per structure
    def forward(self, z, pos, batch):
        i, j = torch.triu_indices(len(pos), len(pos), 1)
        same = batch[i] == batch[j]
        r = (pos[i[same]] - pos[j[same]]).norm(dim=-1)
        e = torch.exp(-r) + 1e-3 * pos[i[same], 2]  # the second term reads the lab z axis: not invariant
        return torch.zeros(int(batch.max()) + 1, dtype=pos.dtype).index_add(0, batch[i[same]], e)


report = geolie.audit(MyPotential(), "xtb-md/aspirin:test", limit=4, threshold=1e-6, progress=False)
print(report.table())
