import pytest
import torch
from ase.neighborlist import neighbor_list
from ase import Atoms

from geolie.neighbors import radius_graph


def _pairs(ei):
    return set(map(tuple, ei.T.tolist()))


def test_matches_ase_open_system():
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(60, 3, generator=g, dtype=torch.float64) * 6
    ei = radius_graph(pos, 2.0, block=17)
    i, j = neighbor_list("ij", Atoms("H60", positions=pos.numpy()), 2.0)
    assert _pairs(ei) == set(zip(j.tolist(), i.tolist()))


def test_batch_separates_structures_and_max_neighbors():
    pos = torch.zeros(4, 3, dtype=torch.float64)
    pos[:, 0] = torch.tensor([0.0, 0.5, 0.0, 0.9])
    batch = torch.tensor([0, 0, 1, 1])
    ei = radius_graph(pos, 1.0, batch)
    assert _pairs(ei) == {(0, 1), (1, 0), (2, 3), (3, 2)}
    pos = torch.tensor([[0.0, 0, 0], [0.1, 0, 0], [0.3, 0, 0], [0.6, 0, 0]])
    ei = radius_graph(pos, 1.0, max_num_neighbors=1)
    assert _pairs(ei) == {(1, 0), (0, 1), (1, 2), (2, 3)}


def test_errors():
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        radius_graph(torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="positive"):
        radius_graph(torch.zeros(3, 3), 0.0)


def test_padded_batches_match_the_blockwise_path():
    g = torch.Generator().manual_seed(1)
    sizes = [5, 17, 1, 9, 30]
    batch = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    pos = torch.rand(len(batch), 3, generator=g, dtype=torch.float64) * 4
    fast = radius_graph(pos, 1.5, batch)  # many small structures: the padded path
    slow = radius_graph(pos, 1.5, batch, block=7)  # forces the blockwise path (padding would exceed 4 blocks)
    assert _pairs(fast) == _pairs(slow) and fast.shape == slow.shape
    assert torch.equal(radius_graph(pos, 1.5, batch, max_num_neighbors=3), radius_graph(pos, 1.5, batch, block=7,
                                                                                        max_num_neighbors=3))
