"""The papermill runner: parameters from a profile, overrides, failure reporting, --keep-going."""
import json

import nbformat as nbf
import pytest

from safemed_lib import reproduce


def _notebook(path, body, params="x = 1\ny = 'a'"):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = nbf.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbf.v4.new_code_cell(body)]
    nbf.write(nb, path)


@pytest.fixture
def books(tmp_path):
    d = tmp_path / "nb"
    d.mkdir()
    _notebook(d / "01_ok.ipynb", "print('x is', x, 'y is', y)")
    _notebook(d / "02_fail.ipynb", "raise RuntimeError('boom in cell two')")
    _notebook(d / "03_after.ipynb", "print('third ran', x)")
    prof = tmp_path / "prof.yaml"
    prof.write_text("profile: unit\nx: 5\ny: b\nunused: 3\n")
    return d, prof


def _outputs(path):
    nb = nbf.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


def test_profile_values_and_overrides_reach_the_notebook(books, tmp_path):
    d, prof = books
    rc = reproduce.main(["--profile", str(prof), "--notebooks", str(d), "--only", "01",
                         "--out", str(tmp_path / "out"), "-p", "y=zz"])
    assert rc == 0
    assert "x is 5 y is zz" in _outputs(tmp_path / "out" / "01_ok.ipynb")
    summary = json.loads((tmp_path / "out" / "summary-partial.json").read_text())
    assert summary["notebooks"][0]["parameters"] == {"x": 5, "y": "zz"}  # undeclared keys are not injected
    assert summary["partial"] and not (tmp_path / "out" / "summary.json").exists()


def test_partial_run_keeps_the_full_runs_summary(books, tmp_path):
    d, prof = books
    out = tmp_path / "out"
    reproduce.main(["--profile", str(prof), "--notebooks", str(d), "--out", str(out), "--keep-going"])
    full = json.loads((out / "summary.json").read_text())
    assert [n["notebook"] for n in full["notebooks"]] == ["01_ok.ipynb", "02_fail.ipynb", "03_after.ipynb"]
    assert not full["partial"]
    assert reproduce.main(["--profile", str(prof), "--notebooks", str(d), "--out", str(out), "--only", "03"]) == 0
    assert json.loads((out / "summary.json").read_text()) == full  # untouched by the --only run
    partial = json.loads((out / "summary-partial.json").read_text())
    assert [n["notebook"] for n in partial["notebooks"]] == ["03_after.ipynb"]


def test_failure_names_notebook_and_cell_keeps_partial_output_and_stops(books, tmp_path, capsys):
    d, prof = books
    rc = reproduce.main(["--profile", str(prof), "--notebooks", str(d), "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "02_fail.ipynb failed at cell" in err and "boom in cell two" in err
    assert (tmp_path / "o" / "02_fail.ipynb").exists()  # the partial notebook is kept
    assert not (tmp_path / "o" / "03_after.ipynb").exists()  # stopped


def test_keep_going_runs_the_rest_and_still_fails(books, tmp_path):
    d, prof = books
    rc = reproduce.main(["--profile", str(prof), "--notebooks", str(d), "--out", str(tmp_path / "o"),
                         "--keep-going"])
    assert rc == 1
    assert "third ran 5" in _outputs(tmp_path / "o" / "03_after.ipynb")


def test_prepare_only_injects_without_running(books, tmp_path):
    d, prof = books
    assert reproduce.main(["--profile", str(prof), "--notebooks", str(d), "--out", str(tmp_path / "p"),
                           "--prepare-only"]) == 0
    nb = nbf.read(tmp_path / "p" / "02_fail.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert _outputs(tmp_path / "p" / "02_fail.ipynb") == ""


def test_bad_profile_and_override_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="no file"):
        reproduce.load_profile("nonexistent-profile")
    with pytest.raises(SystemExit, match="key=value"):
        reproduce.parse_overrides(["novalue"])


def test_shipped_profiles_load():
    for name in ("smoke", "tiny", "paper"):
        p = reproduce.load_profile(name)
        assert p["profile"] == name and "seed" in p and "threads" in p


def test_notebook_parameter_defaults_are_the_tiny_profile():
    """A notebook opened and run by hand in JupyterLab gets the same settings as `make reproduce`
    (e.g. every notebook that loads SFT-nothink names the same cached run)."""
    tiny = reproduce.load_profile("tiny")
    for nb in reproduce.find_notebooks():
        cell = next(c for c in nbf.read(nb, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        defaults = {}
        exec(cell.source, defaults)
        wrong = {k: (v, tiny.get(k, "<not in tiny.yaml>")) for k, v in defaults.items()
                 if not k.startswith("__") and tiny.get(k, "<not in tiny.yaml>") != v}
        assert not wrong, f"{nb.name}: parameter defaults differ from configs/tiny.yaml: {wrong}"
        # papermill must see every one of them, or a profile's value is never injected
        unseen = {k for k in defaults if not k.startswith("__")} - reproduce.declared_parameters(nb)
        assert not unseen, f"{nb.name}: papermill cannot parse the parameters {sorted(unseen)}"
