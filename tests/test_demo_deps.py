"""``bond-kernels demo`` without its optional packages: the subcommand is still listed, and running it prints one
message naming what is missing and the extra to install, exits with status 1, shows no traceback and builds
nothing.  It used to train for a minute and die on ``import matplotlib`` with a traceback."""

import os
import subprocess
import sys

import pytest

from bond_kernels import cli, demo
from bond_kernels._demo import deps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh interpreter in which the packages named in argv[2] cannot be imported, then the CLI with argv[3:].
# argv[1] says how they are hidden, as the two ways an environment can lack a package look to find_spec:
# "none"   - sys.modules[name] = None: find_spec returns None, import raises (a package that is not there);
# "finder" - a finder first on sys.meta_path raises ModuleNotFoundError for them (a broken or refused one).
HIDING_CLI = """
import importlib.abc, sys
mode, hidden, argv = sys.argv[1], set(sys.argv[2].split(",")) - {""}, sys.argv[3:]
if mode == "none":
    for name in hidden:
        sys.modules[name] = None
else:
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in hidden:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None
    sys.meta_path.insert(0, Hide())
from bond_kernels.cli import main
sys.exit(main(argv))
"""


def _cli(mode, hidden, *argv):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="400")  # argparse would wrap the help inside words
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-c", HIDING_CLI, mode, ",".join(hidden), *argv]
    # cwd = the repository root: "-c" puts it first on sys.path, so this checkout's bond_kernels runs.
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_demo_is_listed_without_its_packages():
    run = _cli("finder", deps.REQUIREMENTS, "--help")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "{info,demo}" in run.stdout
    # the help line names what the demo needs and how to install it
    assert deps.INSTALL in " ".join(run.stdout.split())
    for name in deps.REQUIREMENTS:
        assert name in run.stdout


# Each case in a fresh interpreter (about 3 s each on 2 cores, most of it importing torch).
CASES = [
    ("none", ("matplotlib",)),  # the reported failure: a minute of training, then a traceback at the plot
    ("finder", ("transformers",)),  # used to make the subcommand vanish ("invalid choice")
    ("none", ("transformers", "matplotlib", "tqdm")),
]


@pytest.mark.parametrize("mode,hidden", CASES, ids=["-".join(h) for _, h in CASES])
def test_demo_without_packages_says_what_to_install(mode, hidden, tmp_path):
    out = tmp_path / "out"
    run = _cli(mode, hidden, "demo", "--out", str(out), "--quiet")
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("bond-kernels demo: "), run.stderr
    for name in hidden:
        assert name in lines[0]
        assert deps.REQUIREMENTS[name] in lines[1]  # the pin of each missing one
    for name in set(deps.REQUIREMENTS) - set(hidden):
        assert f'"{deps.REQUIREMENTS[name]}"' not in lines[1]  # present ones are not asked for
    assert f"from the bond_kernels checkout: {deps.INSTALL}" in lines[1]
    # Nothing ran after the check: no table, no progress, and not even the flags' checks, which create --out.
    assert run.stdout == ""
    assert not out.exists()


def test_check_runs_before_anything_is_built(monkeypatch, tmp_path):
    real = deps.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "matplotlib" else real(name, *args, **kwargs)

    called = []
    monkeypatch.setattr(deps.importlib.util, "find_spec", find_spec)
    for owner, name in ((demo, "run_jbond"), (demo, "_check_args"), (demo._demo.train, "build_model")):
        monkeypatch.setattr(owner, name, lambda *a, _name=name, **k: called.append(_name))
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--out", str(tmp_path / "out"), "--quiet"])
    assert isinstance(exc.value.code, str)  # SystemExit(str): printed to stderr, status 1
    assert exc.value.code == deps.message(["matplotlib"])
    assert called == []
    assert not (tmp_path / "out").exists()


def test_message_names_the_missing_and_the_extra():
    one = deps.message(["matplotlib"])
    assert one.startswith("bond-kernels demo: matplotlib is not installed;")
    assert f"checkout: {deps.INSTALL}  (or only the missing" in one and '"matplotlib>=3.5"' in one
    two = deps.message(["transformers", "tqdm"])
    assert "transformers, tqdm are not installed" in two and '"transformers>=4.44" "tqdm>=4.60"' in two


def test_nothing_missing_here_passes(monkeypatch):
    monkeypatch.setattr(deps.importlib.util, "find_spec", lambda name, *a, **k: object())
    assert deps.missing() == []
    deps.check()  # returns, no SystemExit


def test_importing_the_package_and_the_cli_stays_light():
    # transformers takes seconds to import and matplotlib is only needed for the plot: neither is imported by
    # `import bond_kernels`, by `bond_kernels.demo` or by building the CLI's parser.
    code = (
        "import sys, bond_kernels, bond_kernels.demo, bond_kernels.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('transformers', 'matplotlib') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_extra_lists_exactly_what_the_check_looks_up():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert extras["demo"] == list(deps.REQUIREMENTS.values())


# bond_kernels is not on an index: `pip install "bond_kernels[demo]"` (what the message and README used to say)
# fails.  The command given is the checkout install, the same in the message, the help and README.
UNPUBLISHED = 'pip install "bond_kernels[demo]"'


def test_install_command_works_from_a_checkout():
    assert deps.INSTALL == 'pip install --no-build-isolation -e ".[demo]"'
    assert UNPUBLISHED not in deps.message(["tqdm"]) and UNPUBLISHED not in deps.HELP
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert UNPUBLISHED not in readme and 'pip install "bond_kernels' not in readme
    assert deps.INSTALL in readme
    # pip resolves it here, offline, without installing anything (--dry-run): the extra exists, the path is a
    # project.
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
            "-e",
            ".[demo]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "Would install bond_kernels" in run.stdout, (
        run.stdout[-2000:] + run.stderr[-2000:]
    )


def test_make_setup_installs_the_demo_extra():
    # `make demo` runs .venv/bin/bond-kernels demo after `make setup`: its editable install names the extra.
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        installs = [line for line in f if "pip install" in line and "-e " in line]
    assert len(installs) == 1, installs
    extras = installs[0].split('-e ".[', 1)[1].split("]", 1)[0].split(",")
    assert "demo" in extras and "dev" in extras, installs[0]
