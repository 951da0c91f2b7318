"""One error tree: every error raised on purpose is a TokenFactoryError that carries its HTTP answer."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from factory.errors import TokenFactoryError

ROOT = Path(__file__).resolve().parents[1]


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _project_modules():
    for pkg in ("schemas", "factory", "jobs", "serve", "cli"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__main__":
                continue  # running it is what importing it does
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_project_exception_class_is_in_the_tree():
    """An Exception subclass defined in the project's sources is a TokenFactoryError (ApiError, the HTTP
    answer itself, is the one exception)."""
    outside = []
    for path in (ROOT / p for p in ("schemas", "factory", "jobs", "serve", "cli")):
        for f in path.rglob("*.py"):
            for m in re.finditer(r"^class (\w+)\(([^)]*)\):", f.read_text(), re.M):
                name, bases = m.groups()
                if (
                    re.search(r"\b(Exception|Error|OSError|ValueError|KeyError|RuntimeError)\b", bases)
                    and "TokenFactoryError" not in bases
                    and name != "ApiError"
                ):
                    module = importlib.import_module(".".join(f.relative_to(ROOT).with_suffix("").parts))
                    if not issubclass(getattr(module, name), TokenFactoryError):
                        outside.append(f"{f.relative_to(ROOT)}: {name}")
    assert not outside, outside


def test_every_error_names_an_http_status_and_a_snake_case_code():
    for module in _project_modules():
        try:
            importlib.import_module(module)
        except ImportError:  # an optional backend's module (nothing here today); it cannot define errors we raise
            continue
    classes = [TokenFactoryError, *_all_subclasses(TokenFactoryError)]
    assert len(classes) > 30
    for cls in classes:
        assert 400 <= cls.http_status <= 599, cls
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", cls.code), cls


@pytest.mark.parametrize(
    "qualname,status,code",
    [
        ("factory.registry.UnknownVersion", 404, "no_such_version"),
        ("factory.registry.ChecksumMismatch", 409, "version_unreadable"),
        ("factory.storage.StorageError", 503, "store_unavailable"),
        ("factory.storage.NotFoundInStorage", 404, "not_found"),
        ("serve.state.IncompatibleRegistry", 409, "incompatible_registry"),
        ("factory.errors.UnknownConceptMarker", 404, "unknown_concept"),
    ],
)
def test_former_outsiders_keep_their_builtin_bases_and_gain_an_http_answer(qualname, status, code):
    module, name = qualname.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, TokenFactoryError) and (cls.http_status, cls.code) == (status, code)


def test_the_service_maps_an_error_by_its_attributes():
    from factory.registry import UnknownVersion
    from serve.deployments import prompt_error

    assert prompt_error(UnknownVersion("version 9 is not committed")) == {
        "error": {"status": 404, "code": "no_such_version", "message": "version 9 is not committed"}
    }
    assert prompt_error(ValueError("NUL in prompt"))["error"]["code"] == "bad_prompt"


def test_the_cli_turns_any_tree_error_into_one_line_and_exit_2(capsys, tmp_path):
    from cli.main import main

    assert main(["export", "--registry", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokenfactory export: error:"), err


# ---- errors survive pickling (Ray re-raises a remote error from its pickle) ----------------------------------


def _factory_error_classes():
    for module in _project_modules():
        if module.split(".")[0] == "factory":
            try:
                importlib.import_module(module)
            except ImportError:
                continue
    return [c for c in [TokenFactoryError, *_all_subclasses(TokenFactoryError)] if c.__module__.startswith("factory")]


# Classes whose __init__ is not (message): their own arguments.
_SPECIAL_ARGS = {
    "UnknownConceptMarker": ((["red-dress", "blue-coat"],), {"known": 3}),
    "StorageError": (("the store is down",), {"uri": "s3://b/k"}),
    "NotFoundInStorage": (("no such key",), {"uri": "s3://b/k"}),
}


def _instance(cls):
    args, kwargs = _SPECIAL_ARGS.get(cls.__name__, ((f"{cls.__name__}: what went wrong and what to do",), {}))
    return cls(*args, **kwargs)


def test_every_factory_error_round_trips_through_pickle():
    import pickle

    classes = _factory_error_classes()
    assert {"UnknownConceptMarker", "ConfigError", "StorageError", "UnknownVersion"} <= {c.__name__ for c in classes}
    for cls in classes:
        err = _instance(cls)
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls, cls
        assert (str(back), back.http_status, back.code) == (str(err), err.http_status, err.code), cls
        assert back.args == err.args, cls
        assert vars(back) == vars(err), cls


def test_an_error_keeps_its_own_attributes_through_pickle():
    import pickle

    from factory.errors import UnknownConceptMarker
    from factory.storage import StorageError

    marker = pickle.loads(pickle.dumps(UnknownConceptMarker(["a", "b"], known=2)))
    assert marker.missing == ["a", "b"] and str(marker).startswith("no token for concept(s) a, b (2 concepts")
    storage_error = pickle.loads(pickle.dumps(StorageError("down", uri="s3://b/k")))
    assert storage_error.uri == "s3://b/k" and str(storage_error) == "down"


def test_an_error_raised_in_a_ray_task_is_caught_by_its_own_class(ray_cluster):
    from factory.errors import UnknownConceptMarker

    @ray_cluster.remote
    def fails():
        raise UnknownConceptMarker(["red-dress"], known=1)

    with pytest.raises(UnknownConceptMarker) as e:
        ray_cluster.get(fails.remote())
    assert e.value.missing == ["red-dress"] and (e.value.http_status, e.value.code) == (404, "unknown_concept")
    assert "no token for concept(s) red-dress (1 concepts are known)" in str(e.value)
