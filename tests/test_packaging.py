"""The project's metadata agrees with itself: pins, MLproject parameters, README and CI."""

from __future__ import annotations

import re
import tomllib

import yaml

from millvae.config import PARAM_DEFAULTS, PARAM_NAMES, make_config

from .conftest import REPO


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_conda_yaml_pins_match_pyproject():
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    deps = conda["dependencies"]
    python = [d for d in deps if isinstance(d, str) and d.startswith("python")]
    assert python and re.fullmatch(r"python=3\.11\.\d+", python[0]), python
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert sorted(pip) == sorted(_pyproject()["project"]["dependencies"])


def test_checked_pins_are_there():
    deps = _pyproject()["project"]["dependencies"]
    for pin in ("tensorflow==2.21.*", "keras-tcn==3.5.6", "mlflow==3.17.*"):
        assert pin in deps
    assert not any(d.startswith("tensorflow-cpu") for d in deps)


def test_mlproject_main_parameters_match_the_config():
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    main = spec["entry_points"]["main"]
    params = main["parameters"]
    assert list(params) == list(PARAM_NAMES)
    # defaults written in MLproject give the same validated config as the code's defaults
    as_strings = {k: ("" if v["default"] is None else str(v["default"])) for k, v in params.items()}
    assert make_config(**as_strings) == make_config(**PARAM_DEFAULTS)
    for name in PARAM_NAMES:
        assert f"--{name} {{{name}}}" in main["command"]


def test_readme_documents_every_parameter_with_its_default():
    readme = (REPO / "README.md").read_text()
    for name in PARAM_NAMES:
        m = re.search(rf"^\| `{name}` \| (.*?) \|", readme, re.M)
        assert m, f"README lacks a row for {name}"
        shown = m.group(1).strip("`*")
        if PARAM_DEFAULTS[name] == "":
            assert "empty" in shown
        else:
            assert make_config(**{name: shown}) == make_config(**{name: PARAM_DEFAULTS[name]})


def test_readme_first_screen_commands_and_ci_agree():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    setup_run, setup_test = blocks[0].strip(), blocks[1].strip()
    assert setup_run.endswith(
        "mlflow run . --env-manager local --experiment-name millvae -P beta=1.25"
    )
    assert "pip install -e ." in setup_run
    assert setup_test.endswith("python -m pytest")
    ci = (REPO / ".ci" / "run").read_text()
    install = setup_test.rsplit("&&", 1)[0].strip()
    assert install in ci
    assert "python -m pytest" in ci


def test_the_kernels_source_ships_with_the_package():
    # model/native.py compiles model/csrc/*.cc on first use: a wheel without them has none
    from fnmatch import fnmatch

    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["millvae"]
    sources = [p.relative_to(REPO / "millvae").as_posix() for p in (REPO / "millvae").rglob("*.cc")]
    assert sources
    for src in sources:
        assert any(fnmatch(src, pat) for pat in patterns), src
