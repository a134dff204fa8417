"""`specssm sim`: the float64 reference by default, the Triton op with --kernel (fp32 by default; the
interpreter on a CPU), each checked by the simulator against the sequential recurrence."""
import pytest

from specssm.sim import cli


def _run(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr()


def _errors(out):
    """(outputs, implied state) max relative errors from the summary line."""
    tail = out.split("max rel error: outputs ")[1]
    o, s = tail.split(", implied state ")
    return float(o), float(s.split()[0])


def test_reference(capsys):
    rc, r = _run(["--steps", "30", "--window", "4"], capsys)
    assert rc == 0 and r.out.startswith("checkpointing_ssu_ref, fp64: 30 steps"), r.out
    assert max(_errors(r.out)) <= 1e-10 and "write fraction 0.00" not in r.out


@pytest.mark.interpreter
def test_kernel(capsys):
    """Failed with `dt_cache: expected torch.float32 for the Triton op, got torch.float64` whatever the
    arguments: the simulator ran in float64. W = 4 makes rows write from the second step on."""
    rc, r = _run(["--kernel", "--steps", "3", "--window", "4"], capsys)
    assert rc == 0 and r.out.startswith("checkpointing_ssu (Triton), fp32: 3 steps"), r.out + r.err
    assert max(_errors(r.out)) <= 1e-4 and "write fraction 0.00" not in r.out


def test_kernel_bad_dtype_and_no_interpreter(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli.main(["--kernel", "--dtype", "fp64"])
    assert e.value.code == 2 and "--dtype: the Triton op takes fp32, bf16 or fp16" in capsys.readouterr().err
    import specssm._runtime
    monkeypatch.setattr(specssm._runtime, "kernels_interpreted", lambda: False)
    rc, r = _run(["--kernel", "--steps", "1"], capsys)
    assert rc == 2 and "TRITON_INTERPRET=1 specssm sim --kernel" in r.err
