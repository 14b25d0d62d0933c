import numpy as np
import pytest
import torch
from ase.neighborlist import neighbor_list
from ase import Atoms

import geolie.neighbors
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


def _ase_pairs(atoms, rc):
    from ase.neighborlist import neighbor_list as ase_nl

    i, j, S = ase_nl("ijS", atoms, rc)
    return sorted(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))


def _geolie_pairs(atoms, rc):
    from geolie.neighbors import neighbor_list

    periodic = bool(atoms.pbc.any())
    i, j, S = neighbor_list(torch.tensor(atoms.positions), rc,
                            cell=torch.tensor(np.array(atoms.cell)) if periodic else None,
                            pbc=atoms.pbc.tolist() if periodic else None)
    return list(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))


@pytest.mark.parametrize("seed", range(4))
def test_cell_list_equals_ase_neighbor_list(seed):
    from ase import Atoms

    rng = np.random.default_rng(seed)
    cases = [
        (Atoms("H60", positions=rng.uniform(-3, 7, (60, 3))), 2.2),  # open
        (Atoms("H12", positions=rng.uniform(0, 5, (12, 3)), cell=np.diag([5.0, 5.5, 6.0]), pbc=True), 2.5),
        (Atoms("H7", positions=rng.uniform(-2, 5, (7, 3)),  # skewed, cutoff larger than the cell, atoms outside it
               cell=[[3.0, 0, 0], [1.2, 2.5, 0], [0.7, -0.4, 2.2]], pbc=True), 5.5),
        (Atoms("H20", positions=rng.uniform(0, 8, (20, 3)), cell=np.diag([8, 9, 7.5]), pbc=[True, False, True]), 3.0),
    ]
    for atoms, rc in cases:
        assert _geolie_pairs(atoms, rc) == _ase_pairs(atoms, rc)


def test_cell_list_batches_never_pair_structures_and_radius_graph_agrees():
    from geolie.neighbors import CELL_LIST_FROM, neighbor_list

    g = torch.Generator().manual_seed(0)
    pos = torch.rand(400, 3, generator=g, dtype=torch.float64) * 6  # two overlapping clouds
    batch = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    i, j, S = neighbor_list(pos, 1.5, batch=batch)
    assert bool((batch[i] == batch[j]).all()) and not bool((S != 0).any())
    d = torch.cdist(pos, pos)
    expected = ((d < 1.5) & (batch[:, None] == batch[None]) & ~torch.eye(400, dtype=torch.bool)).sum()
    assert i.numel() == int(expected)
    big = torch.rand(CELL_LIST_FROM + 500, 3, generator=g, dtype=torch.float64) * 30
    e_cell = radius_graph(big, 2.0)  # cell-list path
    old = geolie.neighbors.CELL_LIST_FROM
    try:
        geolie.neighbors.CELL_LIST_FROM = 10 ** 9
        e_all = radius_graph(big, 2.0)  # all-pairs path
    finally:
        geolie.neighbors.CELL_LIST_FROM = old
    assert torch.equal(e_cell, e_all)


def test_neighbor_list_bad_input():
    from geolie.neighbors import neighbor_list

    with pytest.raises(ValueError, match="shape"):
        neighbor_list(torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        neighbor_list(torch.full((3, 3), float("nan")), 1.0)
    with pytest.raises(ValueError, match="non-degenerate"):
        neighbor_list(torch.zeros(3, 3), 1.0, cell=torch.zeros(3, 3))


@pytest.mark.parametrize("periodic", [False, True])
def test_vesin_and_geolie_give_the_same_pairs(periodic):
    """vesin (the default on the CPU) and geolie's own cell list find the same (i, j, S), open and periodic (a skewed
    cell with a cutoff larger than a lattice plane spacing), batched open structures too."""
    from ase.build import bulk

    g = torch.Generator().manual_seed(3)
    if periodic:
        at = bulk("Cu", "fcc", a=3.6).repeat((3, 2, 2))
        at.rattle(0.1, seed=4)
        pos, cell, batch = torch.tensor(at.positions), torch.tensor(at.cell.array), None
    else:
        pos, cell = torch.rand(300, 3, generator=g, dtype=torch.float64) * 12, None
        batch = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 120, 80]))
    a = geolie.neighbors.neighbor_list(pos, 4.1, cell=cell, batch=batch, backend="vesin")
    b = geolie.neighbors.neighbor_list(pos, 4.1, cell=cell, batch=batch, backend="geolie")
    assert a[0].numel() > 100
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    if batch is not None:
        assert not bool((batch[a[0]] != batch[a[1]]).any())


def test_neighbour_search_inside_torch_func_transforms():
    """A model that builds its radius graph from the positions while geolie differentiates it with torch.func (jvp):
    the wrapped tensors have no memory for vesin, so geolie's own list serves them, with the same edges."""
    pos = torch.rand(40, 3, dtype=torch.float64) * 6
    plain = radius_graph(pos, 2.5)

    def count(p):
        return p.sum() * 0 + radius_graph(p, 2.5).shape[1]

    out, tangent = torch.func.jvp(count, (pos,), (torch.ones_like(pos),))
    assert int(out) == plain.shape[1] and float(tangent) == 0.0
