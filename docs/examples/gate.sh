# in CI: pytest runs the gate above; the command line gates too (exit status 1 names each failing figure)
python -m pytest -q -p no:cacheprovider test_gate.py 2>&1 | tail -n 1 | sed "s/ in .*//"
geolie audit --model cartesian-mlp --data xtb-md/ethanol:test --limit 1 --n-finite 1 --out audit-gate \
    --fail-above 1e-6 > gate.log 2>&1
echo "exit status $?"
grep "^FAIL" gate.log
