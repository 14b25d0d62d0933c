# the same audit from the command line, on a model of yours found by module:factory in the current folder
geolie audit --model my_potential:make_potential --data xtb-md/aspirin:test --limit 2 --out audit-own \
    --n-finite 1 --fail-above 1e-6
echo "exit status $?"
ls audit-own
