"""What ``bond-kernels demo`` needs beyond bond_kernels' own dependencies, and the check that runs before any
work.  The check only looks the packages up (``importlib.util.find_spec``; importing transformers alone takes
seconds), so a missing one is reported in one message before anything is built, instead of as a traceback
after a minute of training (matplotlib is first imported when the plot is drawn, at the very end)."""

import importlib.util

# import name -> requirement; the same list as the ``demo`` extra in pyproject.toml (tests/test_demo_deps.py
# compares the two).
REQUIREMENTS = {
    "transformers": "transformers>=4.44",  # the Llama reference, policy and anchor
    "matplotlib": "matplotlib>=3.5",  # demo.png
    "tqdm": "tqdm>=4.60",  # the progress bars (a core dependency too; looked up because the demo imports it)
}
# bond_kernels is not published on an index: the demo extra is installed from the checkout (README, "Two commands").
INSTALL = 'pip install --no-build-isolation -e ".[demo]"'
HELP = (
    f"J-BOND on a small transformers causal LM (the main job; needs {', '.join(REQUIREMENTS)}: "
    f"{INSTALL} in the bond_kernels checkout)"
)


def missing():
    """The names of ``REQUIREMENTS`` that cannot be imported here, in that order."""
    absent = []
    for name in REQUIREMENTS:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a finder that refuses the name; a module left without __spec__
            found = False
        if not found:
            absent.append(name)
    return absent


def message(absent):
    """The one message for the missing packages ``absent`` (a non-empty list of names)."""
    pins = " ".join(f'"{REQUIREMENTS[name]}"' for name in absent)
    return (
        f"bond-kernels demo: {', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed; "
        f"the demo needs {', '.join(REQUIREMENTS)}.\n"
        f"Install the demo extra from the bond_kernels checkout: {INSTALL}  (or only the missing: pip install {pins})"
    )


def check():
    """Exit with status 1 and :func:`message` on stderr, without a traceback, if anything is missing."""
    absent = missing()
    if absent:
        raise SystemExit(message(absent))
