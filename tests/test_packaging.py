"""The project takes no import name of another distribution: neither by shadowing it from the repository's folder
(which is first on sys.path when online_dpo.py runs, from any working directory) nor by installing over it.

transformers >= 5.25 depends on Hugging Face's `kernels` package and imports it by that name; a folder of ours named
`kernels/` made every run die when transformers loaded a model (issue 34). These checks read what is installed
now, so that they cannot go stale: a dependency that brings a new top-level name is checked against ours too.
"""

import importlib.metadata
import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = {"online-dpo", "online_dpo"}


def others_names():
    """Each top-level import name installed here by a distribution other than ours: {name: [distributions]}."""
    provided = importlib.metadata.packages_distributions()
    return {name: sorted(set(d) - OURS) for name, d in provided.items() if set(d) - OURS}


def repo_names():
    """The import names the repository's folder offers on sys.path: its modules and packages."""
    names = set()
    for entry in os.listdir(REPO):
        path = os.path.join(REPO, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
    return names


def test_the_repository_shadows_no_installed_distribution():
    others = others_names()
    clashes = {name: others[name] for name in repo_names() if name in others}
    assert not clashes, f"folders or modules of the repository shadow installed distributions: {clashes}"
    assert not repo_names() & set(sys.stdlib_module_names)


@pytest.mark.parametrize("where", ["the repository's root", "another folder"])
def test_transformers_imports_hugging_faces_kernels_beside_online_dpo(where, tmp_path):
    """As `python online_dpo.py` does from either folder: the script's folder first on sys.path, online_dpo imported,
    then what transformers imports when it loads a model."""
    code = f"""
import importlib.metadata, importlib.util, os, sys
sys.path.insert(0, {REPO!r})  # what `python online_dpo.py` puts first
import online_dpo
import transformers.integrations.hub_kernels  # what failed with our kernels/ on the path
spec = importlib.util.find_spec("kernels")
if spec is not None:
    import kernels
    dist = importlib.metadata.distribution("kernels")
    theirs = {{os.path.realpath(dist.locate_file(f)) for f in dist.files}}
    assert os.path.realpath(kernels.__file__) in theirs, kernels.__file__
    assert not os.path.realpath(kernels.__file__).startswith(os.path.realpath({REPO!r}) + os.sep)
    print("kernels is Hugging Face's:", kernels.__file__)
print("ok")
"""
    cwd = REPO if where == "the repository's root" else str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_the_wheel_installs_only_names_of_its_own(tmp_path):
    """`pip install .` writes the wheel's files into site-packages: none of them may be a file of another installed
    distribution (it would be overwritten), and none of its top-level names another distribution's."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), REPO],
                          capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(p for p in tmp_path.iterdir() if p.suffix == ".whl")
    files = [name for name in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in name.split("/")[0] + "/"]
    top = {name.split("/")[0].removesuffix(".py") for name in files}
    assert top == {"online_dpo", "dpo_kernels", "dpo_support"}, top  # tests/ and benchmarks/ stay out
    others = others_names()
    clashes = {name: others[name] for name in top if name in others}
    assert not clashes, f"the wheel installs import names of other distributions: {clashes}"
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"] in OURS or not dist.files:
            continue
        overwritten = set(files) & {str(f) for f in dist.files}
        assert not overwritten, f"pip install . would overwrite {dist.metadata['Name']}'s {sorted(overwritten)[:3]}"
