"""geolie._store: rows kept on disk (RowFile), resume and merge read them without holding them."""
import csv
import io
import json
import os

import numpy as np
import pytest

import geolie
from geolie._store import ResultStore, RowFile


def _row(i, v=1.0):
    return {"index": i, "name": f"s{i}", "atoms": 3, "method": "hvp", "notes": [],
            "outputs": {"energy": {"rel": [v, 2 * v], "abs": [v, v], "floor": [0.0, 1e-16], "floor_rel": [0.0, 1e-16],
                                   "source": "model", "ad_check": 1e-16}}, "finite": {}}


def test_rowfile_reads_rows_by_index_without_holding_them(tmp_path):
    """Index order whatever the file order; a repeated index: the later line; a line cut by an interruption (no
    final newline) and blank lines are left out; a row whose index is not its first key is still found."""
    p = tmp_path / "results.jsonl"
    moved = {"name": "s7", "index": 7, "outputs": {}}
    text = "".join(json.dumps(r) + "\n" for r in [_row(5), _row(2), _row(5, 3.0)]) + "\n" + json.dumps(moved) + "\n"
    p.write_text(text + json.dumps(_row(9))[:-10])  # the cut line of an interrupted write
    rf = RowFile.scan(str(p))
    assert rf.indices.tolist() == [2, 5, 7] and len(rf) == 3
    assert [r["index"] for r in rf] == [2, 5, 7]
    assert rf.row(5)["outputs"]["energy"]["rel"] == [3.0, 6.0]  # the later of the two lines
    assert rf[-1] == moved and rf[0:2] == [_row(2), _row(5, 3.0)]
    assert rf.has(7) and not rf.has(9) and not rf.has(3)
    with pytest.raises(KeyError, match="structure 9"):
        rf.row(9)
    with pytest.raises(IndexError):
        rf[3]
    assert b"".join(rf.lines()).decode() == "".join(json.dumps(r) + "\n" for r in [_row(2), _row(5, 3.0), moved])
    assert RowFile.scan(str(p), keep=[7, 2, 11]).indices.tolist() == [2, 7]
    assert len(RowFile.scan(str(tmp_path / "absent.jsonl"))) == 0 and len(RowFile.empty()) == 0
    q = tmp_path / "other.jsonl"  # a file put in its place (a resume rewrites through os.replace): refused
    q.write_text(text)
    os.replace(q, p)
    with pytest.raises(ValueError, match="was replaced since its rows were read"):
        rf[0]
    rf = RowFile.scan(str(p))
    p.write_text(text.replace('"index": 2', '"index": 3', 1))  # edited in place: a row is not its structure's
    with pytest.raises(ValueError, match="no longer the row of structure 2"):
        rf[0]
    p.write_text("x" * len(text))
    with pytest.raises(ValueError, match="no longer the row of structure 2"):
        list(rf)


def test_resume_rewrites_both_files_in_index_order(tmp_path):
    store = ResultStore(str(tmp_path), ["rx", "ry"])
    store.extend([_row(4), _row(1)])
    store.append(_row(0))
    with open(store.jsonl, "a") as fh:
        fh.write(json.dumps(_row(6))[:30])  # killed mid-write
    done = store.resume()
    assert done.indices.tolist() == [0, 1, 4]
    assert list(done) == [_row(0), _row(1), _row(4)]  # read at the offsets counted while rewriting
    lines = open(store.jsonl).read().splitlines()
    assert [json.loads(s)["index"] for s in lines] == [0, 1, 4]
    table = list(csv.reader(io.StringIO(open(store.csv).read())))
    assert table[0][:7] == ["index", "name", "atoms", "output", "source", "method", "rel_rx"]
    assert [r[0] for r in table[1:]] == ["0", "1", "4"]
    store.append(_row(2))  # appends after the rewrite
    assert store.rows().indices.tolist() == [0, 1, 2, 4]


def test_merge_compares_rows_as_stored(tmp_path):
    """One index in two folders: equal rows (NaN included, which is not == NaN once parsed) merge; different ones are
    an error naming the second folder."""
    meta = {"model": "m", "group": "SE3", "dtype": "float64", "generators": ["rx", "ry"], "meta": {},
            "n_structures_total": 3, "shard": None, "indices": []}
    nan_row = _row(1, float("nan"))
    for name, rows in (("x", [_row(0), nan_row]), ("y", [nan_row, _row(2)]), ("z", [_row(2, 5.0)])):
        s = ResultStore(str(tmp_path / name), meta["generators"])
        s.extend(rows)
        s.write_meta(meta)
    rep = geolie.merge([str(tmp_path / "x"), str(tmp_path / "y")], out_dir=str(tmp_path / "out"))
    assert isinstance(rep.rows, RowFile) and rep.rows.indices.tolist() == [0, 1, 2]
    assert np.isnan(rep.rows.row(1)["outputs"]["energy"]["rel"][0])
    back = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["index"] for r in back["structures"]] == [0, 1, 2] and back["n_structures"] == 3
    with pytest.raises(ValueError, match=r"structure 2 has different results in two folders \(the second: .*z\)"):
        geolie.merge([str(tmp_path / "y"), str(tmp_path / "z"), str(tmp_path / "x")])


def test_report_with_zero_floors_plots(tmp_path):
    """Exact arithmetic (every floor 0) must not break the plots' log axis."""
    row = _row(0)
    row["outputs"]["energy"]["floor_rel"] = [0.0, 0.0]
    files = geolie.write_report(geolie.AuditReport("m", "SE3", "float64", [row], ["rx", "ry"]), str(tmp_path))
    assert any(f.endswith("lie_energy.png") for f in files)
