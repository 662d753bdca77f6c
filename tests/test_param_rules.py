"""The declared parameter rules (:mod:`scatlas._params`): one common test feeds every decorated
public function invalid values built from its own rules and checks that the error names the
parameter, before any work is done (the other arguments are placeholders the function would
choke on, so a rule that let a bad value through fails the test with another error)."""

import importlib
import inspect
import pkgutil

import numpy as np
import pytest

import scatlas
from scatlas._params import Each, Interval, Options, check_param, validate_params
from scatlas.exceptions import ScatlasInputError

PACKAGES = ("scatlas.kernels", "scatlas.tl", "scatlas.pp", "scatlas.metrics", "scatlas.search")


def _public_functions():
    seen = {}
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        modules = [pkg]
        if hasattr(pkg, "__path__"):
            for info in pkgutil.iter_modules(pkg.__path__, pkg_name + "."):
                try:
                    modules.append(importlib.import_module(info.name))
                except ImportError:  # an optional dependency (faiss, cupy) is absent
                    continue
        for module in modules:
            for name, obj in vars(module).items():
                if name.startswith("_") or not callable(obj):
                    continue
                rules = getattr(obj, "__scatlas_params__", None)
                if rules is not None:
                    seen[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return seen


FUNCTIONS = _public_functions()
def _admits(rules, value):
    try:
        check_param(value, "x", rules)
    except ScatlasInputError:
        return False
    return True


def _rules(rules):
    return rules if isinstance(rules, tuple) else (rules,)


CASES = sorted({
    (qualname, param, repr(bad)): bad
    for qualname, fn in FUNCTIONS.items()
    for param, rules in fn.__scatlas_params__.items()
    for rule in _rules(rules) if rule is not None
    for bad in rule.invalid_examples()
    if not _admits(rules, bad)
}.items())


def test_the_functions_the_issue_names_declare_their_rules():
    names = set(FUNCTIONS)
    for want in ("scatlas.kernels.nmf.inmf", "scatlas.kernels.nmf.uinmf",
                 "scatlas.kernels.nmf.jnmf",
                 "scatlas.kernels.online_nmf.online_inmf", "scatlas.kernels.linalg.rsvd",
                 "scatlas.kernels.linalg.pca", "scatlas.kernels.neighbors.knn",
                 "scatlas.tl._inmf.inmf", "scatlas.tl._inmf_online.online_inmf",
                 "scatlas.tl._linalg.pca"):
        assert want in names, want


@pytest.mark.parametrize("qualname", sorted(FUNCTIONS))
def test_defaults_obey_the_rules(qualname):
    fn = FUNCTIONS[qualname]
    sig = inspect.signature(fn)
    for param, rules in fn.__scatlas_params__.items():
        default = sig.parameters[param].default
        if default is not inspect.Parameter.empty:
            assert _admits(rules, default), (qualname, param, default)


@pytest.mark.parametrize("case", [c[0] for c in CASES], ids=[" ".join(c[0]) for c in CASES])
def test_invalid_value_is_refused_by_name(case):
    qualname, param, _ = case
    bad = dict(CASES)[case]
    fn = FUNCTIONS[qualname]
    sig = inspect.signature(fn)
    kwargs = {}
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name == param:
            kwargs[name] = bad
        elif name in fn.__scatlas_params__:
            valid = next(r for r in _rules(fn.__scatlas_params__[name]) if r is not None)
            kwargs[name] = (p.default if p.default is not p.empty
                            else valid.valid_example())
        elif p.default is p.empty:
            kwargs[name] = object()  # a placeholder no kernel accepts
    with pytest.raises(ScatlasInputError) as err:
        fn(**kwargs)
    assert err.value.param == param
    assert param in str(err.value)


# --------------------------------------------------------------------- the rules themselves


@pytest.mark.parametrize("rule, good, bad", [
    (Interval("int", 1), [1, 7, np.int64(3)], [0, -1, 1.5, True, "1", None]),
    (Interval("real", 0), [0, 0.0, 2.5, np.float32(1)], [-1e-9, float("nan"), float("inf"), "a"]),
    (Interval("real", 0, 1, closed="left"), [0, 0.5], [1, 1.0, -0.1]),
    (Interval("int", 0, 10, closed="neither"), [1, 9], [0, 10]),
    (Options(("bpp", "hals")), ["bpp", "hals"], ["BPP", 1, None]),
    (Options((False, True)), [True, False, np.bool_(True)], [1, 0, "True", None]),
    (Each(Interval("real", 0)), [1.0, [1, 2], np.array([0.0, 3.0])], [-1, [1, -1], ["a"]]),
])
def test_rules_accept_and_refuse(rule, good, bad):
    for v in good:
        assert rule.error(v, "p") is None, v
    for v in bad:
        assert rule.error(v, "p") is not None, v
    assert rule.error(rule.valid_example(), "p") is None
    for v in rule.invalid_examples():
        assert rule.error(v, "p") is not None, v


def test_none_admitted_only_when_declared_and_messages_keep_scatlas_wording():
    @validate_params(k=Interval("int", 1), tol=(None, Interval("real", 0)))
    def f(X, k=2, *, tol=None):
        return k

    assert f(None, 3, tol=None) == 3
    with pytest.raises(ScatlasInputError, match=r"^k must be >= 1, got 0$"):
        f(None, 0)
    with pytest.raises(ScatlasInputError, match=r"^tol must be None or >= 0, got -1$"):
        f(None, tol=-1)
    with pytest.raises(TypeError):  # a wrong call keeps Python's own message
        f(None, 1, 2, 3)
    with pytest.raises(TypeError, match="no parameter"):
        validate_params(q=Interval("int"))(f.__wrapped__)


def test_rules_run_before_the_work(monkeypatch):
    calls = []
    monkeypatch.setattr(scatlas.kernels.nmf, "_move", lambda *a, **k: calls.append(1))
    with pytest.raises(ScatlasInputError, match="n_restarts"):
        scatlas.kernels.inmf([np.ones((5, 4))] * 2, k=2, n_restarts=0)
    assert calls == []
