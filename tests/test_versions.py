"""The supported torch / triton / numpy range is declared once (pyproject.toml), CI's pins once
(.ci/requirements.txt, inside the range), and scripts/check_versions.py holds an environment to it."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_versions", ROOT / "scripts" / "check_versions.py")
cv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cv)


def test_ranges_are_declared_and_hold_here():
    want = cv.ranges()
    assert set(cv.CHECKED) <= set(want) and all(want[n] for n in cv.CHECKED), want
    assert cv.main([]) == 0                              # this environment (CI's venv) is in range


def test_pins_lie_in_the_ranges_and_only_in_one_place():
    pins = cv.pins()
    assert set(cv.CHECKED) <= set(pins), pins
    assert cv.problems(pins, cv.ranges()) == []
    make = (ROOT / "Makefile").read_text()
    assert "-r .ci/requirements.txt" in make and "==" not in make


def test_range_check():
    want = {"torch": [(">=", "2.11"), ("<", "2.14")], "triton": [(">=", "3.6"), ("<", "3.7")]}
    assert cv.satisfies("2.11.0+cu130", want["torch"]) and cv.satisfies("2.13.0", want["torch"])
    assert not cv.satisfies("2.14.0", want["torch"]) and not cv.satisfies("2.10.1", want["torch"])
    assert cv.satisfies("3.6.0", want["triton"]) and not cv.satisfies("3.7.0", want["triton"])
    assert cv.problems({"torch": "2.15.0", "triton": "3.6.0"}, want) == [
        "torch 2.15.0: expected >=2.11,<2.14 (pyproject.toml)"]


def test_main_fails_on_an_unsupported_install(monkeypatch, capsys):
    real = cv.importlib.metadata.version
    monkeypatch.setattr(cv.importlib.metadata, "version", lambda n: "9.0.0" if n == "triton" else real(n))
    assert cv.main([]) == 1
    assert "unsupported: triton 9.0.0: expected" in capsys.readouterr().err
