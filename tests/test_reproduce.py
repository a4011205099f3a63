"""The papermill runner: the profile and its overrides reach the notebooks, failure reporting, --keep-going."""
import json

import nbformat as nbf
import pytest

from safemed_lib import reproduce

PARAMS = 'profile = "tiny"\noverrides = {}'
SHOW = "from safemed_lib import config\ncfg = config.load(profile, overrides)\n"


def _notebook(path, body, params=PARAMS):
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
    _notebook(d / "01_ok.ipynb", SHOW + "print('eps is', cfg.attack.eps, 'steps is', cfg.sft.think.steps)")
    _notebook(d / "02_fail.ipynb", "raise RuntimeError('boom in cell two')")
    _notebook(d / "03_after.ipynb", SHOW + "print('third ran', cfg.sft.think.steps)")
    prof = tmp_path / "prof.yaml"
    prof.write_text("profile: unit\nsft:\n  think: {steps: 5}\n")
    return d, prof


def _outputs(path):
    nb = nbf.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


def test_profile_values_and_overrides_reach_the_notebook(books, tmp_path):
    d, prof = books
    rc = reproduce.main(["--profile", str(prof), "--notebooks", str(d), "--only", "01",
                         "--out", str(tmp_path / "out"), "--set", "attack.eps=4"])
    assert rc == 0
    assert "eps is 4.0 steps is 5" in _outputs(tmp_path / "out" / "01_ok.ipynb")
    summary = json.loads((tmp_path / "out" / "summary-partial.json").read_text())
    assert summary["notebooks"][0]["parameters"] == {"profile": str(prof), "overrides": {"attack.eps": 4}}
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


def test_bad_profile_and_override_are_clear_errors_before_any_notebook_runs(books, tmp_path, capsys):
    d, prof = books
    assert reproduce.main(["--profile", "nonexistent-profile", "--notebooks", str(d), "--out", str(tmp_path / "o")]) == 2
    assert "no file" in capsys.readouterr().err
    assert reproduce.main(["--profile", str(prof), "--notebooks", str(d), "--out", str(tmp_path / "o"),
                           "--set", "attack.epss=4"]) == 2
    assert "unknown configuration key 'attack.epss'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_every_notebook_takes_only_profile_and_overrides_with_tiny_defaults():
    """A notebook opened by hand in JupyterLab runs the embedded default; papermill injects the rest."""
    for nb in reproduce.find_notebooks():
        cell = next(c for c in nbf.read(nb, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        defaults = {}
        exec(cell.source, defaults)
        assert {k: v for k, v in defaults.items() if not k.startswith("__")} == {"profile": "tiny", "overrides": {}}, nb.name
        assert reproduce.declared_parameters(nb) == {"profile", "overrides"}, nb.name
