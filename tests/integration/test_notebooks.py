"""The notebooks run top to bottom without error (nbclient, on this virtualenv's Python).

``quickstart.ipynb`` starts its own Redis, emulator and Ray cluster (it is the user's entry
point, so it must not lean on the session fixtures) and stops them in its last cell.
``benchmark_report.ipynb`` runs twice: on a results directory with figures shaped like the
benchmarks' output, and on an empty one, where it must say that no results exist yet.

A kernelspec pointing at ``sys.executable`` is written to a temporary Jupyter path for the
module, so the notebooks run on this venv whatever ``python`` is on PATH, and nothing is
installed into the venv.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
KERNEL_NAME = "bella-ray-worker-test"
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernelspec for this interpreter, on a Jupyter path only this test module sees."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name=KERNEL_NAME, display_name="bella-ray-worker (test)", prefix=str(prefix))
    spec = json.loads((prefix / "share/jupyter/kernels" / KERNEL_NAME / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        yield KERNEL_NAME


def _run(name: str, kernel_name: str) -> Any:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    return notebook


def _text(notebook: Any) -> str:
    parts: list[str] = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def _images(notebook: Any) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


@pytest.mark.timeout(900)
def test_quickstart_runs(kernel_name: str) -> None:
    notebook = _run("quickstart.ipynb", kernel_name)
    text = _text(notebook)
    assert "tasks answered in" in text
    assert "stopped; Ray running: False" in text
    assert _images(notebook) >= 1


_WORKER_RESULT = {
    "benchmark": "worker",
    "publisher": {
        "event_publisher_events_per_s": 30000,
        "raw_pipelined_xadd_events_per_s": 25000,
        "publisher_vs_raw_ratio": 1.2,
    },
    "idle_pickup": {
        "ours_put_to_first_sse_ms": {"p50": 90.0, "p99": 190.0},
        "java_like_put_to_take_ms": {"p50": 60.0, "p99": 190.0},
        "java_like_put_to_answer_ms": {"p50": 62.0, "p99": 199.0},
        "ours_idle_takes_per_s": 16.0,
        "java_like_idle_takes_per_s": 9.0,
    },
    "tiny_model": {
        "direct_vllm": {"tokens_per_s": 100.0, "ttft_ms": {"p50": 50.0}},
        "through_worker": {"tokens_per_s": 90.0, "ttft_ms": {"p50": 70.0}},
        "ratio_tokens_per_s_worker_vs_direct": 0.9,
    },
}


_TAKE_RESULT = {
    "per_take": {"httpx": {"cpu_us_per_take": 728.2}, "kept": {"cpu_us_per_take": 196.5}},
    "idle_poller": {"httpx": {"cpu_pct_of_a_core": 4.43}, "kept": {"cpu_pct_of_a_core": 2.24}},
    "idle_cpu_ratio_kept_to_httpx": 0.506,
}


@pytest.mark.timeout(300)
def test_benchmark_report_plots_results(
    kernel_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "worker.json").write_text(json.dumps(_WORKER_RESULT))
    (tmp_path / "take.json").write_text(json.dumps(_TAKE_RESULT))
    monkeypatch.setenv("BELLA_BENCH_RESULTS", str(tmp_path))
    notebook = _run("benchmark_report.ipynb", kernel_name)
    text = _text(notebook)
    assert "2 result file(s)" in text
    assert "idle CPU ratio, kept / httpx: 0.506" in text
    assert _images(notebook) == 4


@pytest.mark.timeout(300)
def test_benchmark_report_says_when_there_are_no_results(
    kernel_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BELLA_BENCH_RESULTS", str(tmp_path))
    notebook = _run("benchmark_report.ipynb", kernel_name)
    assert "No benchmark results yet" in _text(notebook)
    assert _images(notebook) == 0
