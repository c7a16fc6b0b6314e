"""parallel/ and data_pipeline/ import as magitrain.parallel / magitrain.data_pipeline, both for the
editable install the tests run under and for a regular (non-editable) ``pip install .``."""

import os
import site
import subprocess
import sys

from conftest import REPO

PROBE = ("import magitrain, magitrain.parallel.mask as m, magitrain.data_pipeline.text as t, magitrain.layout;"
         "import importlib.util as u; print(m.__file__); print(t.__file__);"
         "print(u.find_spec('parallel') is None and u.find_spec('data_pipeline') is None)")


def _probe(python, cwd):
    r = subprocess.run([python, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_editable_install_maps_subpackages(tmp_path):
    mask_file, text_file, only_one_name = _probe(sys.executable, tmp_path)
    assert mask_file == os.path.join(REPO, "parallel", "mask.py")
    assert text_file == os.path.join(REPO, "data_pipeline", "text.py")
    assert only_one_name == "True"  # no top-level 'parallel' or 'data_pipeline' on the path


def test_regular_install_maps_subpackages(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    # The probe venv sees the packages of *this* interpreter (torch, omegaconf, ...) whether it is
    # the system one or a venv: `--system-site-packages` would expose the base interpreter's instead.
    # Paths listed in a .pth file are added without running the .pth files inside them, so this
    # interpreter's editable-install finder for magitrain stays out of the probe.
    probe_site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(probe_site, "parent_site.pth"), "w") as f:
        f.write("\n".join(p for p in site.getsitepackages() if os.path.isdir(p)) + "\n")
    build = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", REPO],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    mask_file, text_file, only_one_name = _probe(py, tmp_path)
    venv_root = str(venv)
    assert mask_file.startswith(venv_root) and mask_file.endswith(os.path.join("magitrain", "parallel", "mask.py"))
    assert text_file.startswith(venv_root) and text_file.endswith(os.path.join("magitrain", "data_pipeline", "text.py"))
    assert only_one_name == "True"
