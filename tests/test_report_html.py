"""``report.html`` (geolie._html): self-contained, the report's numbers, atoms coloured where the model breaks.

Two audits of two aspirin structures in float64 with the hunt on the first: :class:`truth_models.AtomWells` (a
lab-frame well on atoms 0 and 3 only: the forces break on those atoms and nowhere else, in closed form) and the exact
:class:`truth_models.Morse`. The file is checked as text (no resource fetched from the network, the verdict table's
numbers), then opened in headless Chromium (Debian's ``chromium``, driven by Playwright): no console error, no request
but the file itself, the verdict table as the browser shows it equals ``report.json``'s aggregates, the 3D view's
screenshot is not blank, and the atoms coloured as breaking are the planted ones (grey for the exact model).
"""
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import geolie

sys.path.insert(0, os.path.dirname(__file__))
import truth_models as tm  # noqa: E402

PLANTED = (0, 3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from geolie.cli import main

    base = tmp_path_factory.mktemp("html")
    sts = geolie.data.load("xtb-md/aspirin", "test")[:2]
    out = {}
    for name, model in (("planted", tm.AtomWells(PLANTED)), ("exact", tm.Morse())):
        rep = geolie.audit(model, sts, dtype=torch.float64, out_dir=str(base / name), progress=False, n_finite=1)
        geolie.write_report(rep, str(base / name))
        out[name] = (str(base / name), rep)
    # the CLI with --hunt (the hunt's worst orientation drawn beside the base one)
    assert main(["audit", "--model", "pair-mlp", "--data", "xtb-md/aspirin:test", "--limit", "1", "--hunt",
                 "--out", str(base / "cli")]) == 0
    out["cli"] = (str(base / "cli"), None)
    return out


def _page(folder):
    with open(os.path.join(folder, "report.html"), encoding="utf-8") as fh:
        return fh.read()


def test_report_html_is_written_and_self_contained(folders):
    """geolie's markup references nothing outside the file. The inlined script is plotly's bundle, byte for byte; its
    code holds URL strings (its logo's link, map-tile attributions) for features these plots do not use: that
    nothing is fetched is checked in the browser (every request recorded)."""
    from plotly.offline import get_plotlyjs

    bundle = "<script>" + get_plotlyjs() + "</script>"
    for folder, _ in folders.values():
        page = _page(folder)
        assert page.startswith("<!DOCTYPE html>")
        assert page.count(bundle) == 1
        page = page.replace(bundle, "")
        # no resource from elsewhere: no src/href to http(s), no CSS url() or @import of one, no <link> at all
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
        assert not re.search(r"""url\(\s*["']?\s*(https?:)?//""", page, re.I)
        assert "<link" not in page.lower() and "@import" not in page.lower()


def test_report_html_verdict_table_holds_report_json_numbers(folders):
    folder, _ = folders["planted"]
    page = _page(folder)
    rep = json.load(open(os.path.join(folder, "report.json")))
    table = page[page.index('id="verdict-table"'):]
    table = table[:table.index("</table>")]
    for name, a in rep["aggregates"].items():
        for g in rep["generators"]:
            for stat in ("median", "max"):
                assert f'data-value="{a[g][stat]!r}">{a[g][stat]:.1e}<' in table, (name, g, stat)
    assert "BREAKS" not in table and "above floor" in table  # no threshold given: measurably non-zero, no BREAKS


def test_report_html_colours_the_planted_atoms(folders):
    """The per-atom magnitudes the page colours by (the gallery, geolie._gallery): the planted atoms carry the forces'
    Lie derivative in closed form, every other atom is at floor (grey), and the exact model's atoms are all at floor.
    Rows do not carry them (their size does not grow with the structure)."""
    for name in ("planted", "exact"):
        folder, rep = folders[name]
        assert len(rep.gallery) == 2 and all("per_point" not in o for r in rep.rows for o in r["outputs"].values())
        on_disk = json.load(open(os.path.join(folder, "gallery.json")))["structures"]
        assert on_disk == json.loads(json.dumps(rep.gallery))
        for entry in rep.gallery:
            o = entry["outputs"]["forces"]
            pp = np.asarray(o["per_point"])
            assert pp.shape == (entry["atoms"],)
            floor = float(np.sqrt(np.mean(np.square(o["floor"][:3]))))
            grey = pp <= 2 * floor
            if name == "exact":
                assert grey.all(), (pp.max(), floor)
            else:
                assert set(np.nonzero(~grey)[0]) == set(PLANTED), (np.nonzero(~grey)[0], floor)
                # closed form: F_i = −2 ε z_i ê_z on a planted atom; L_X F_i = J_i X x_i − X F_i (J of the well:
                # −2ε ê_z ê_zᵀ), RMS over the rotation generators
                geo = np.asarray(entry["geometry"]["positions"])
                for i in PLANTED:
                    assert pp[i] == pytest.approx(_closed_form_per_atom(geo[i], 1e-3), rel=1e-3)


def test_gallery_keeps_the_worst_and_merges_shards(tmp_path):
    """The gallery keeps the k structures with the largest relative rotational Lie derivative; shards' galleries
    merge to the gallery of one run over everything."""
    from geolie._gallery import Gallery

    sts = geolie.data.load("xtb-md/aspirin", "test")[:6]
    model = tm.GlobalBreak(1e-4)
    whole = geolie.audit(model, sts, n_finite=0, progress=False)
    scores = sorted(((max(r["outputs"][o]["rel"][k] for o in r["outputs"] for k in range(3)), r["index"])
                     for r in whole.rows), reverse=True)
    small = Gallery(whole.generator_names, k=3)
    assert [e["index"] for e in whole.gallery] == [i for _, i in scores][:len(whole.gallery)]
    for k in range(2):
        geolie.audit(model, sts, n_finite=0, progress=False, shard=(k, 2), out_dir=str(tmp_path / f"s{k}"))
    merged = geolie.merge([str(tmp_path / "s0"), str(tmp_path / "s1")], out_dir=str(tmp_path / "m"))
    assert [e["index"] for e in merged.gallery] == [e["index"] for e in whole.gallery]
    assert os.path.exists(tmp_path / "m" / "gallery.json")
    small.extend(whole.gallery)
    assert [e["index"] for e in small.entries] == [i for _, i in scores][:3]


def _closed_form_per_atom(x, eps):
    from geolie import hat

    ez = np.array([0.0, 0.0, 1.0])
    F = -2 * eps * x[2] * ez
    J = -2 * eps * np.outer(ez, ez)  # dF/dx of the well term (the Morse part is exactly equivariant)
    norms = []
    for k in range(3):
        X = hat(torch.eye(3, dtype=torch.float64)[k]).numpy()
        norms.append(np.linalg.norm(J @ (X @ x) - X @ F))
    return float(np.sqrt(np.mean(np.square(norms))))


#: JavaScript: a structure plot's trace of atoms coloured by their Lie derivative (the one with a colour scale)
_COLOURED = "(d => d.data.find(t => t.mode === 'markers' && t.marker.cmax !== undefined))"


def _browser():
    """(playwright's sync_playwright, chromium path) or a skip naming what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no browser test: playwright is not installed (pip install playwright; .ci/run installs it)")
    exe = os.environ.get("GEOLIE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("no browser test: no chromium executable (apt-get install chromium; .ci/run installs it; or set "
                    "GEOLIE_CHROMIUM)")
    return sync_playwright, exe


def _open(folder, sync_playwright, exe, check):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--use-angle=swiftshader",
                                                                "--enable-unsafe-swiftshader"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto("file://" + os.path.abspath(os.path.join(folder, "report.html")))
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length > 0 && "
                                   "[...document.querySelectorAll('.plot')].every(d => d.data)", timeout=60000)
            page.wait_for_timeout(500)
            check(page)
            assert not errors, errors
            assert all(u.startswith("file://") for u in requests), requests
            assert len(requests) == 1  # the file itself: nothing else is fetched
        finally:
            browser.close()


def test_report_html_in_a_browser(folders, tmp_path):
    from PIL import Image

    sync_playwright, exe = _browser()
    folder, _ = folders["planted"]
    rep = json.load(open(os.path.join(folder, "report.json")))

    def check(page):
        cells = page.eval_on_selector_all("#verdict-table tbody tr", "rows => rows.map(r => [...r.cells].map("
                                          "c => c.innerText.trim()))")
        gens = rep["generators"]
        shown = {(r[0], r[1]): r for r in cells}
        for name, a in rep["aggregates"].items():
            for stat in ("median", "max"):
                r = shown[(name, stat)]
                assert r[2:2 + len(gens)] == [f"{a[g][stat]:.1e}" for g in gens]
            assert shown[(name, "median")][-1] == a["verdict"]["overall"]
        assert page.inner_text("#run-verdict") == rep["verdict"]
        # the coloured atoms of the worst structure are the planted ones
        worst = page.evaluate("() => { const d = document.querySelector('[id^=structure-]'); "
                              f"const t = {_COLOURED}(d); "
                              "return [d.id, t.marker.color, t.marker.cmax, t.marker.colorscale]; }")
        div, colour, cmax, scale = worst
        colour = np.asarray(colour)
        grey_to = scale[1][0] * cmax
        assert set(np.nonzero(colour > grey_to)[0]) == set(PLANTED)
        shot = str(tmp_path / "structure.png")
        page.locator(f"#{div}").screenshot(path=shot)
        img = np.asarray(Image.open(shot).convert("RGB")).astype(float)
        assert img.std() > 10  # not blank
        # the planted atoms are drawn in red-amber: such pixels exist (a blank or all-grey view has none)
        reddish = (img[..., 0] > 180) & (img[..., 1] < 120) & (img[..., 2] < 100)
        assert reddish.sum() > 20

    _open(folder, sync_playwright, exe, check)


def test_report_html_in_a_browser_exact_model_is_grey(folders, tmp_path):
    sync_playwright, exe = _browser()
    folder, _ = folders["exact"]

    def check(page):
        data = page.evaluate("() => [...document.querySelectorAll('[id^=structure-]')].map(d => { "
                             f"const t = {_COLOURED}(d); return [t.marker.color, t.marker.colorscale]; }})")
        assert data
        for colour, scale in data:
            assert scale[-1][1] == scale[0][1]  # one colour: every atom at floor
        verdicts = page.eval_on_selector_all("#verdict-table td.v-BREAKS, #verdict-table td.v-above", "c => c.length")
        assert verdicts == 0

    _open(folder, sync_playwright, exe, check)


def test_report_html_hunt_panel(folders):
    sync_playwright, exe = _browser()
    folder, _ = folders["cli"]

    def check(page):
        scenes = page.evaluate("() => { const d = document.querySelector('[id^=structure-]'); "
                               "return [d.layout.scene !== undefined, d.layout.scene2 !== undefined, "
                               "d.layout.annotations[0].text]; }")
        assert scenes[0] and scenes[1] and "worst orientation" in scenes[2]

    _open(folder, sync_playwright, exe, check)


def test_merge_writes_report_html(folders, tmp_path):
    folder, _ = folders["planted"]
    geolie.merge([folder], out_dir=str(tmp_path / "merged"))
    assert os.path.exists(tmp_path / "merged" / "report.html")
    a = _page(folder)
    b = _page(str(tmp_path / "merged"))
    tab = lambda s: s[s.index('id="verdict-table"'):s.index("</table>", s.index('id="verdict-table"'))]  # noqa: E731
    assert tab(a) == tab(b)
