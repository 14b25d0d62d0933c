"""Audit an ASE calculator on a periodic cell: finite differences (their error estimate is the floor), with stress."""
from ase.build import bulk
from ase.calculators.emt import EMT

import geolie

atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
atoms.rattle(0.05, seed=1)
report = geolie.audit(EMT(), [atoms], n_finite=1, progress=False)
print(report.table())
