"""Issue 11, point 10: every console script, every user error a tired user makes — an ``--out`` that is a file, lies
under a file or cannot be written; a count of 0 or a negative size — exits 2 with one line naming the input, never a
traceback, and writes nothing (no folder of a refused run blocks the corrected one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from retina_io.pack import PackConfig, pack
from retina_io.shard_cli import main as shard_main
from retina_train.bundle import main as export_main
from retina_train.demo import main as demo_main
from retina_train.evaluate import main as eval_main
from retina_train.predict import main as predict_main
from retina_train.run import main as run_main
from retina_train.stack.cli import main as stack_main
from tests.conftest import write_synfundus_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """20 small images packed into 2 folds: enough for run.py to get past its plan check to its --out check."""
    root = tmp_path_factory.mktemp("cli")
    images, labels = write_synfundus_folder(root / "src", 20)
    pack(PackConfig(images=images, labels=labels, preset="synfundus", out=root / "shards", folds=2, workers=1,
                    progress=False))  # fmt: skip
    return root / "shards"


def _pack(d, out, *extra):
    src = d.parent / "src"
    return shard_main(["pack", "--images", str(src), "--labels", str(src / "labels.csv"), "--preset", "synfundus",
                       "--out", str(out), "--workers", "1", "--no-progress", *extra])  # fmt: skip


def _run(d, out, *extra):
    return run_main(["--backbone", "tiny_resnet", "--data", str(d), "--out", str(out), "--device", "cpu", "--folds",
                     "0", "--batch-size", "2", "--backend", "wds", *extra])  # fmt: skip


def _stack(d, out, *extra):
    return stack_main(["--runs", str(d.parent / "runs"), "--data", str(d), "--out", str(out), "--no-progress", *extra])


def _eval(d, out, *extra):
    return eval_main(["--runs", str(d.parent / "runs"), "--data", str(d), "--out", str(out), "--device", "cpu", *extra])


def _export(d, out, *extra):
    return export_main(["--runs", str(d.parent / "runs"), "--out", str(out), *extra])


def _predict(d, out, *extra):
    return predict_main(["--bundle", str(d.parent / "b.retina"), "--images", str(d.parent / "src"), "--out", str(out),
                         "--device", "cpu", *extra])  # fmt: skip


def _demo(d, out, *extra):
    return demo_main(["--out", str(out), "--device", "cpu", *extra])


def _preview(d, out, *extra):  # --out is a PNG file: "a folder" is the refused kind here, not "a file"
    return shard_main(["preview", str(d), "--out", str(out), "--backend", "wds", *extra])


COMMANDS = {"retina-shard pack": _pack, "run.py": _run, "retina-stack": _stack, "retina-eval": _eval,
            "retina-export": _export, "retina-predict": _predict, "retina-demo": _demo,
            "retina-shard preview": _preview}  # fmt: skip


@pytest.fixture
def unwritable(tmp_path, monkeypatch) -> Path:
    """A folder this process cannot write: its mode says so, and for root (whom modes do not stop) the permission
    check says so too."""
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    real = os.access

    def access(path, mode, *a, **k):
        if Path(path) == ro and mode & os.W_OK:
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)
    yield ro
    ro.chmod(0o755)


def _one_line(err: str, prog: str) -> str:
    """The one error line of ``err`` (libraries may log a warning before it; nothing else counts)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog.split()[0]}: error: "), err
    return lines[0]


@pytest.mark.parametrize("kind", ["a file", "under a file", "unwritable"])
@pytest.mark.parametrize("prog", list(COMMANDS))
def test_unusable_out_is_one_line(data, tmp_path, capsys, unwritable, prog, kind):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    name = "p.png" if prog == "retina-shard preview" else "new"
    out = {"a file": a_file, "under a file": a_file / name, "unwritable": unwritable / name}[kind]
    if prog == "retina-shard preview" and kind == "a file":
        out = tmp_path / "a_folder"  # an existing folder where the PNG should go
        out.mkdir()
    before = sorted(tmp_path.rglob("*"))
    assert COMMANDS[prog](data, out) == 2
    line = _one_line(capsys.readouterr().err, prog)
    assert f"--out {out}" in line, line
    assert sorted(tmp_path.rglob("*")) == before, "nothing written"


@pytest.mark.parametrize(
    ("prog", "extra", "message"),
    [
        ("retina-shard pack", ["--num-nodes", "0"], "--num-nodes must be >= 1; got 0"),
        ("retina-shard pack", ["--node-rank", "1"], "--node-rank must be in 0..0 (--num-nodes 1); got 1"),
        ("retina-shard pack", ["--node-rank", "-1"], "--node-rank must be in 0..0 (--num-nodes 1); got -1"),
        ("retina-shard pack", ["--workers", "0"], "--workers must be >= 1; got 0"),
        ("retina-shard pack", ["--shard-samples", "0"], "--shard-samples must be at least 1; got 0"),
        ("retina-shard preview", ["--n", "0"], "--n must be >= 1; got 0"),
        ("retina-shard preview", ["--image-size", "-5"], "--image-size must be >= 8; got -5"),
        ("retina-shard preview", ["--folds", "x"], "--folds must be a list of fold numbers like 0,2; got 'x'"),
        ("retina-shard preview", ["--folds", "0,"], "--folds must be a list of fold numbers like 0,2; got '0,'"),
        ("retina-shard preview", ["--local-contrast", "-1"], "--local-contrast must be in [0, 0.5] (0: off); got -1.0"),
        ("retina-eval", ["--batch-size", "0"], "--batch-size must be >= 1; got 0"),
        ("retina-eval", ["--bootstrap", "-1"], "--bootstrap must be >= 0; got -1"),
        ("retina-eval", ["--seed", "-1"], "--seed must be >= 0; got -1"),
        ("retina-stack", ["--bootstrap", "-1"], "--bootstrap must be >= 0; got -1"),
        ("retina-stack", ["--seed", "-2"], "--seed must be >= 0; got -2"),
        ("retina-stack", ["--n-estimators", "0"], "--n-estimators must be >= 1; got 0"),
        ("retina-stack", ["--max-depth", "-1"], "--max-depth must be >= 0; got -1"),
        ("retina-stack", ["--learning-rate", "0"], "--learning-rate must be > 0; got 0.0"),
        ("retina-stack", ["--threads", "0"], "--threads must be >= 1; got 0"),
        ("retina-stack", ["--control-rows", "1"], "--control-rows must be >= 2; got 1"),
        ("retina-predict", ["--batch-size", "0"], "--batch-size must be >= 1; got 0"),
        ("retina-predict", ["--workers", "-1"], "--workers must be >= 0; got -1"),
    ],
)
def test_option_out_of_range_is_one_line_and_writes_nothing(data, tmp_path, capsys, prog, extra, message):
    """The inputs need not exist: options are checked before anything is read or written."""
    out = tmp_path / ("p.png" if prog == "retina-shard preview" else "new")
    assert COMMANDS[prog](data, out, *extra) == 2
    assert _one_line(capsys.readouterr().err, prog) == f"{prog.split()[0]}: error: {message}"
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_synth_preview_path_checked_before_generating(tmp_path, capsys):
    from retina_io.synth.cli import main as synth_main

    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "new"
    argv = ["--out", str(out), "--n", "3", "--size", "64", "--seed", "0", "--workers", "1", "--quiet"]
    assert synth_main([*argv, "--preview", str(tmp_path / "a_file" / "p.png")]) == 2
    line = _one_line(capsys.readouterr().err, "retina-synth")
    preview = tmp_path / "a_file" / "p.png"
    assert line == f"retina-synth: error: --preview {preview}: {preview.parent} exists and is not a folder"
    assert not out.exists(), "no images generated before the refusal"


def test_console_scripts_leave_openmp_wait_policy_alone(monkeypatch):
    """The commands do not make OpenMP threads sleep between parallel regions (``OMP_WAIT_POLICY=PASSIVE``, set for
    every command until 2026-12-03): it made each training step 1.6x and the stack's XGBoost fits 1.8x slower on the
    2-core machine. A user's own choice is kept."""
    from retina_io.cli import console_main

    seen = []
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("TQDM_MININTERVAL", "30")  # set_thread_policy may set it; keep it from leaking
    assert console_main("x", lambda argv: seen.append(os.environ.get("OMP_WAIT_POLICY")) or 0, []) == 0
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert console_main("x", lambda argv: seen.append(os.environ.get("OMP_WAIT_POLICY")) or 0, []) == 0
    assert seen == [None, "ACTIVE"]
