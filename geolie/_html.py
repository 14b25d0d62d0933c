"""``report.html``: one self-contained page per audit folder (every script and style inline, nothing fetched).

What it shows, all derived from the :class:`geolie._report.AuditReport` (the same numbers as ``report.json``):

* the run's identity (model, weights and data fingerprints, group, dtype, estimator, seed, geolie version), its
  floors (how each output's floor was obtained) and its notes;
* the verdict table (``id="verdict-table"``): per output the median and max over structures of the relative Lie
  derivative per generator, the isotropic rotation norm, the median relative floor and the verdicts (Lie / finite /
  hunt, :mod:`geolie._verdict`), formatted as the terminal table formats them;
* the distributions, per output, as interactive box plots (plotly, log axis; exact zeros drawn at 1e-18 as in the
  PNGs; more than 5000 structures are drawn from their quantiles);
* the finite checks and the hunt's worst orientations, as tables;
* per structure, for the ``n_structures`` with the largest relative rotational Lie derivative: the structure in 3D
  with each atom coloured by ``‖L_X y_i‖`` of the first per-atom output (forces of a potential, or the per-point
  output of a point-cloud model: RMS over the rotation generators, absolute, as the audit stored it): grey up to
  twice the structure's floor (every atom of an exactly equivariant model), then amber to red up to the largest
  value; next to it, when the structure was hunted, the worst orientation
  found (``pos @ R.T + t``, atoms coloured by element).

Drawing is plotly's (its JavaScript bundle is inlined once, about 4.8 MB). The bundle's code holds URL strings of
services it never calls for these plots (map tiles, help links); the page loads nothing: the browser test records
every request the page makes and finds only the file itself.
"""
from __future__ import annotations

import html
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._verdict import FLOOR_FACTOR

__all__ = ["write_html"]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;
padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}
.v-at{color:#1a7f37}.v-above{color:#9a6700}.v-BREAKS{color:#cf222e;font-weight:bold}
.pair{display:flex;flex-wrap:wrap;gap:1em}.pair>div{flex:1 1 520px}
.small{font-size:.85em;color:#555}code{background:#f4f4f4;padding:0 .2em}
"""


_GREY, _AMBER, _RED = "#c8ced6", "#f0a500", "#cf222e"


def _scale(at_floor_up_to: float, cmax: float) -> List[List[Any]]:
    """Grey from 0 to ``at_floor_up_to`` (at most twice the floor), then amber to red at ``cmax``."""
    f = min(1.0, at_floor_up_to / cmax) if cmax > 0 else 1.0
    if f >= 1.0:
        return [[0.0, _GREY], [1.0, _GREY]]
    return [[0.0, _GREY], [f, _GREY], [min(1.0, f + 1e-6), _AMBER], [1.0, _RED]]


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _num(v: Optional[float], fmt: str = ".1e") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, fmt)


def _verdict_cell(v: str) -> str:
    cls = {"at floor": "v-at", "above floor": "v-above", "BREAKS": "v-BREAKS"}.get(v, "")
    return f'<td class="l {cls}">{_esc(v)}</td>'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], table_id: str = "") -> str:
    """An HTML table; ``rows`` hold ready-made ``<td>`` cells."""
    tid = f' id="{table_id}"' if table_id else ""
    h = "".join(f'<th class="l">{_esc(c)}</th>' if k == 0 else f"<th>{_esc(c)}</th>" for k, c in enumerate(head))
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f"<table{tid}><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------------------------------ sections
def _identity(report) -> str:
    ident = report.meta.get("identity") or {}
    items: List[Tuple[str, Any]] = [("model", report.model), ("structures", len(report.rows)),
                                    ("group", report.group), ("dtype", report.dtype),
                                    ("verdict", report.verdict()), ("threshold", report.meta.get("threshold"))]
    items += [(k, v) for k, v in ident.items() if k not in ("model", "group", "dtype")]
    rows = [[f'<td class="l">{_esc(k)}</td>', f'<td class="l"><code>{_esc(v)}</code></td>'] for k, v in items]
    return _table(["field", "value"], rows, "identity")


def _verdict_table(report, agg: Dict[str, Any]) -> str:
    gens = report.generator_names
    head = ["output", "stat"] + gens + ["iso rot", "floor", "Lie", "finite", "hunt", "overall"]
    rows = []
    for name, a in agg.items():
        for stat in ("median", "max"):
            cells = [f'<td class="l">{_esc(name)}</td>', f'<td class="l">{stat}</td>']
            cells += [f'<td data-value="{a[g][stat]!r}">{_num(a[g][stat])}</td>' for g in gens]
            cells.append(f'<td data-value="{a["iso_rotation"][stat]!r}">{_num(a["iso_rotation"][stat])}</td>')
            if stat == "median":
                cells.append(f'<td data-value="{a["floor_rel_median"]!r}">{_num(a["floor_rel_median"])}</td>')
                v = a["verdict"]
                cells += [_verdict_cell(v.get(k, "–")) for k in ("lie", "finite", "hunt", "overall")]
            else:
                cells += ["<td></td>"] * 5
            rows.append(cells)
    return _table(head, rows, "verdict-table")


def _box_trace(vals: np.ndarray, name: str) -> Dict[str, Any]:
    """One generator's distribution: the values themselves up to 5000 structures, else their quantiles."""
    v = np.clip(vals[np.isfinite(vals)], 1e-18, None)
    if v.size <= 5000:
        return {"type": "box", "y": v.tolist(), "name": name, "boxpoints": "all" if v.size <= 200 else "outliers",
                "jitter": 0.4, "marker": {"size": 3}}
    q = np.quantile(v, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"type": "box", "name": name, "x": [name], "q1": [q[1]], "median": [q[2]], "q3": [q[3]],
            "lowerfence": [q[0]], "upperfence": [q[4]]}


def _distributions(report) -> Tuple[str, List[Dict[str, Any]]]:
    """The box-plot divs and their plotly specs."""
    divs, specs = [], []
    for k, name in enumerate(report.outputs):
        rel = report.values(name, "rel")
        if not rel.size:
            continue
        traces = [_box_trace(rel[:, j], g) for j, g in enumerate(report.generator_names)]
        fl = report.values(name, "floor_rel")
        fl_med = float(np.nanmedian(fl)) if fl.size and np.isfinite(fl).any() else float("nan")
        shapes = ([{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": fl_med, "y1": fl_med,
                    "line": {"dash": "dash", "color": "grey"}}] if fl_med > 0 else [])
        layout = {"title": {"text": f"{name}: ‖L_X y‖/‖y‖ over {len(rel)} structure(s); dashed: median floor; "
                                    "exact zeros at 1e-18"},
                  "yaxis": {"type": "log", "title": {"text": "relative Lie derivative"}}, "showlegend": False,
                  "shapes": shapes, "height": 380, "margin": {"t": 50, "b": 40}}
        div = f"dist-{k}"
        divs.append(f'<div id="{div}" class="plot"></div>')
        specs.append({"div": div, "data": traces, "layout": layout})
    return "".join(divs), specs


def _finite_and_hunt(report, agg: Dict[str, Any]) -> str:
    parts = []
    fams = sorted({f for a in agg.values() for f in a["finite_max_rel"]})
    if fams:
        rows = [[f'<td class="l">{_esc(n)}</td>'] + [f"<td>{_num(a['finite_max_rel'].get(f))}</td>" for f in fams]
                + [_verdict_cell(a["verdict"].get("finite", "–"))] for n, a in agg.items()]
        parts.append("<h2>Finite group elements</h2><p class='small'>Largest relative error "
                     "‖f(g·x) − ρ(g) f(x)‖/‖f(x)‖ over structures per family (inversion is parity: reported, not "
                     "part of the verdict).</p>" + _table(["output"] + fams + ["verdict"], rows, "finite-table"))
    hs = report.hunt_summary()
    if hs:
        rows = []
        for n, h in hs.items():
            v = agg.get(n, {}).get("verdict", {}).get("hunt", "–")
            rows.append([f'<td class="l">{_esc(n)}</td>', f"<td>{_num(h['worst_error'], '.2e')}</td>",
                         f"<td>{_num(h['random_error'], '.2e')}</td>", f"<td>{_esc(h['structure'])}</td>",
                         f"<td>{h['above_floor']}/{h['n']}</td>", f"<td>{h['discontinuous']}/{h['n']}</td>",
                         _verdict_cell(v), f'<td class="l">{_esc(h.get("found_by", ""))}</td>'])
        parts.append("<h2>Worst orientation found (hunt)</h2>" + _table(
            ["output", "worst", "random", "structure", "above floor", "discontinuous", "verdict", "found by"],
            rows, "hunt-table"))
    return "".join(parts)


def _floors_and_notes(report) -> str:
    src: Dict[str, str] = {}
    for r in report.rows:
        for name, o in r.get("outputs", {}).items():
            src.setdefault(name, o.get("floor_source", ""))
        if len(src) == len(report.outputs):
            break
    rows = [[f'<td class="l">{_esc(n)}</td>', f'<td class="l">{_esc(s)}</td>'] for n, s in src.items()]
    out = "<h2>Floors</h2><p class='small'>A floor is the rounding of the model's own arithmetic at the inputs in " \
          f"question; a figure is at floor when it is at most {FLOOR_FACTOR:g}× its floor.</p>" + \
          _table(["output", "how the floor was measured"], rows, "floors")
    notes = report.notes()
    if notes:
        out += "<h2>Notes</h2><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>"
    return out


# ------------------------------------------------------------------------------------------------------ structures
def _coloured_output(entry: Dict[str, Any]) -> Optional[str]:
    """The first output of a gallery entry with one Lie-derivative magnitude per atom."""
    n = entry.get("atoms")
    for name, o in entry.get("outputs", {}).items():
        if o.get("per_point") is not None and len(o["per_point"]) == n:
            return name
    return None


def _bonds(numbers: np.ndarray, pos: np.ndarray) -> Tuple[List[Optional[float]], ...]:
    """Line segments between atoms closer than 1.2 × the sum of their covalent radii (ase.data), for up to 300
    atoms (drawing aid only; nothing is computed from it)."""
    from ase.data import covalent_radii

    xs: List[Optional[float]] = []
    ys: List[Optional[float]] = []
    zs: List[Optional[float]] = []
    if len(numbers) > 300:
        return xs, ys, zs
    r = covalent_radii[numbers]
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    i, j = np.nonzero(np.triu(d < 1.2 * (r[:, None] + r[None]), 1))
    for a, b in zip(i, j):
        for lst, c in ((xs, 0), (ys, 1), (zs, 2)):
            lst += [float(pos[a, c]), float(pos[b, c]), None]
    return xs, ys, zs


def _atoms_traces(numbers, pos, scene: str, colour: Optional[np.ndarray], cmax: float, label: str,
                  unit_note: str, grey_to: float = 0.0, colorbar_x: float = 1.0) -> List[Dict[str, Any]]:
    from ase.data import chemical_symbols
    from ase.data.colors import jmol_colors

    sym = [chemical_symbols[z] for z in numbers]
    bx, by, bz = _bonds(numbers, pos)
    traces: List[Dict[str, Any]] = []
    if bx:
        traces.append({"type": "scatter3d", "mode": "lines", "x": bx, "y": by, "z": bz, "scene": scene,
                       "line": {"color": "#999", "width": 3}, "hoverinfo": "skip", "showlegend": False})
    marker: Dict[str, Any] = {"size": [9 if z > 1 else 6 for z in numbers], "line": {"width": 0}}
    if colour is not None:
        marker.update(color=colour.tolist(), cmin=0.0, cmax=cmax, colorscale=_scale(grey_to, cmax), showscale=True,
                      colorbar={"title": {"text": unit_note}, "len": 0.8, "x": colorbar_x})
        text = [f"atom {i} {s}: ‖L_X {label}_i‖ = {c:.2e}" for i, (s, c) in enumerate(zip(sym, colour))]
    else:
        marker["color"] = ["rgb({},{},{})".format(*(int(255 * c) for c in jmol_colors[z])) for z in numbers]
        text = [f"atom {i} {s}" for i, s in enumerate(sym)]
    traces.append({"type": "scatter3d", "mode": "markers", "x": pos[:, 0].tolist(), "y": pos[:, 1].tolist(),
                   "z": pos[:, 2].tolist(), "scene": scene, "marker": marker, "text": text, "hoverinfo": "text",
                   "showlegend": False})
    return traces


def _structure_figure(report, row: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """``row``: a gallery entry (:mod:`geolie._gallery`)."""
    """One structure: its atoms coloured by the per-atom Lie derivative, and the hunt's worst orientation."""
    geo = row["geometry"]
    numbers, pos = np.asarray(geo["numbers"]), np.asarray(geo["positions"], dtype=np.float64)
    out = _coloured_output(row)
    colour, cmax, note, floor = None, 1.0, "", 0.0
    if out is not None:
        o = row["outputs"][out]
        colour = np.asarray(o["per_point"], dtype=np.float64)
        rot = [k for k, g in enumerate(report.generator_names) if g.startswith("r")]
        floor = float(np.sqrt(np.mean(np.square([o["floor"][k] for k in rot])))) if rot else 0.0
        cmax = max(float(np.nanmax(colour)) if colour.size else 0.0, FLOOR_FACTOR * floor, 1e-300)
        note = f"‖L_X {out}_i‖<br>floor {floor:.1e}"
    hunt = _hunt_of(row, out)
    traces = _atoms_traces(numbers, pos, "scene", colour, cmax, out or "", note, FLOOR_FACTOR * floor,
                           0.47 if hunt is not None else 1.0)
    title = (f"structure {row['index']} ({_esc(row.get('name', ''))}), {row.get('atoms')} atoms: "
             + (f"atoms coloured by ‖L_X {out}_i‖ (RMS over rotations)" if out else "no per-atom output"))
    layout: Dict[str, Any] = {"height": 460, "margin": {"t": 40, "b": 0, "l": 0, "r": 0}, "title": {"text": title},
                              "scene": {"domain": {"x": [0, 0.5]}, "aspectmode": "data"}}
    if hunt is not None:
        name, h = hunt
        R = np.asarray(h["rotation"], dtype=np.float64)
        t = np.zeros(3) if h.get("translation") is None else np.asarray(h["translation"], dtype=np.float64)
        traces += _atoms_traces(numbers, pos @ R.T + t, "scene2", None, 1.0, "", "")
        ang = float(np.linalg.norm(h["axis_angle"]))
        axis = np.asarray(h["axis_angle"]) / ang if ang > 0 else np.array([0.0, 0.0, 1.0])
        layout["scene2"] = {"domain": {"x": [0.5, 1]}, "aspectmode": "data"}
        layout["annotations"] = [{"text": f"worst orientation for {_esc(name)}: {math.degrees(ang):.1f}° about "
                                          f"({axis[0]:.2f}, {axis[1]:.2f}, {axis[2]:.2f}); error "
                                          f"{h['worst_error']:.2e} (floor {h['floor']:.1e})",
                                  "xref": "paper", "yref": "paper", "x": 0.75, "y": 0.0, "showarrow": False}]
    else:
        layout["scene"]["domain"] = {"x": [0, 1]}
    div = f"structure-{row['index']}"
    return f'<div id="{div}" class="plot"></div>', {"div": div, "data": traces, "layout": layout}


def _hunt_of(row: Dict[str, Any], prefer: Optional[str]):
    outs = (row.get("hunt") or {}).get("outputs") or {}
    if not outs:
        return None
    name = prefer if prefer in outs else max(outs, key=lambda n: outs[n]["worst_error"])
    return name, outs[name]


def _structures(report, k: int) -> Tuple[str, List[Dict[str, Any]]]:
    rows = report.gallery[:k]
    if not rows:
        return "<p>No structures to draw (an audit by an older geolie, or one without an output folder's gallery)."\
               "</p>", []
    divs, specs = [], []
    for r in rows:
        d, s = _structure_figure(report, r)
        divs.append(d)
        specs.append(s)
    head = (f"<p class='small'>The {len(rows)} structure(s) with the largest relative rotational Lie derivative "
            f"of {len(report.rows)}. Grey: an atom's ‖L_X y_i‖ is at most {FLOOR_FACTOR:g}× the structure's floor (all "
            "atoms of an exactly equivariant model); amber to red: above it, up to the largest. Drag to rotate; "
            "hover for values.</p>")
    return head + "".join(divs), specs


# ------------------------------------------------------------------------------------------------------ the page
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def render_html(report, n_structures: int = 6) -> str:
    """The page as a string (see the module docstring)."""
    agg = report.aggregates()  # once: a report whose rows are in memory gathers them afresh on every call
    dist_divs, dist_specs = _distributions(report)
    st_divs, st_specs = _structures(report, n_structures)
    specs = json.dumps(dist_specs + st_specs, default=float)  # NaN is a JavaScript literal
    specs = specs.replace("</", "<\\/")
    title = f"geolie audit: {report.model}"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_esc(title)}</title><style>{_STYLE}</style><script>{_plotly_js()}</script></head><body>"
        f"<h1>{_esc(title)}</h1><p>{len(report.rows)} structure(s), {_esc(report.group)}, {_esc(report.dtype)}: "
        f"<b id='run-verdict'>{_esc(report.verdict())}</b>.</p><p class='small'>Verdicts: <b>at floor</b> "
        "(indistinguishable from zero at this precision), <b>above floor</b> (measurably "
        "non-zero, below the threshold or none given), <b>BREAKS</b> (above floor and above the threshold).</p>"
        "<h2>Verdicts</h2><p class='small'>Relative Lie derivative ‖L_X y‖/‖y‖, median and max over structures "
        "(the numbers of report.json's aggregates).</p>" + _verdict_table(report, agg)
        + "<h2>Distributions</h2>" + dist_divs + _finite_and_hunt(report, agg)
        + "<h2>Structures</h2>" + st_divs + "<h2>Run</h2>" + _identity(report) + _floors_and_notes(report)
        + f"<script>const SPECS = {specs};\nfor (const s of SPECS) {{ Plotly.newPlot(s.div, s.data, s.layout, "
          "{responsive: true, displaylogo: false}); }</script></body></html>")


def write_html(report, path: str, n_structures: int = 6) -> str:
    """Write ``report.html`` (see the module docstring) to ``path``; returns ``path``."""
    page = render_html(report, n_structures)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return path
