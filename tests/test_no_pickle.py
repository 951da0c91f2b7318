"""No code path unpickles data: checkpoints and state come from storage, and a pickle runs code on load.

A grep over the project's own sources (so it cannot drift): every torch.load passes weights_only=True,
every np.load passes allow_pickle=False, and nothing calls pickle / cloudpickle / dill loaders directly.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "factory", "jobs", "serve", "cli", "benchmarks")


def _calls(name: str):
    """(file, line, call text) of every call of ``name`` in the project's sources, arguments included."""
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            text = path.read_text()
            for m in re.finditer(re.escape(name) + r"\(", text):
                depth, i = 1, m.end()
                while depth and i < len(text):
                    depth += {"(": 1, ")": -1}.get(text[i], 0)
                    i += 1
                yield path.relative_to(ROOT), text.count("\n", 0, m.start()) + 1, text[m.start() : i]


def test_every_torch_load_is_weights_only():
    bad = [(f, n, c) for f, n, c in _calls("torch.load") if not re.search(r"weights_only\s*=\s*True", c)]
    assert not bad, bad


def test_every_numpy_load_refuses_pickles():
    bad = [(f, n, c) for f, n, c in _calls("np.load") if not re.search(r"allow_pickle\s*=\s*False", c)]
    assert not bad, bad


def test_no_pickle_loaders():
    bad = [
        hit
        for lib in ("pickle", "cloudpickle", "dill", "joblib")
        for fn in ("load", "loads")
        for hit in _calls(f"{lib}.{fn}")
    ]
    assert not bad, bad
