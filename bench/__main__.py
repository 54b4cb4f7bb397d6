"""``python -m bench [--quick]``: the publisher, worker, capacity, take, CPU and peer benchmarks.

Each prints its JSON object; the publisher's goes to ``bench/results/publisher.json``, the
worker's to ``bench/results/worker.json``, the capacity one's to
``bench/results/capacity.json``, the take one's (an idle poller's takes, httpx against kept
connections) to ``bench/results/take.json``, the CPU one's to ``bench/results/cpu.json`` and
the peer one's (the worker against vLLM's own server, tiny model) to
``bench/results/peer.json``. ``--quick`` is passed on to the worker benchmark (it then skips
the tiny-model part) and to the capacity benchmark (a shorter window, no tiny-model part).
This module only sequences them; it measures nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import bench_worker


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    # A child process: bench_publisher prints rather than returns, and runs its own loop.
    publisher = subprocess.run(
        [sys.executable, "-m", "bench.bench_publisher"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    sys.stderr.write(publisher.stderr)
    if publisher.returncode != 0:
        return publisher.returncode
    (results / "publisher.json").write_text(publisher.stdout)
    print(publisher.stdout, flush=True)
    bench_worker.main(argv)
    # A child process too: its own Ray driver, started after the worker benchmark's is gone.
    capacity = subprocess.run(
        [sys.executable, "-m", "bench.bench_capacity", *(a for a in argv if a == "--quick")],
        timeout=1200,
        check=False,
    )
    # What an idle worker's takes cost the poller: httpx against the kept connections.
    take = subprocess.run([sys.executable, "-m", "bench.bench_take"], timeout=600, check=False)
    # CPU per streamed event in each Ray process of the worker (its own Ray, started last).
    cpu = subprocess.run([sys.executable, "-m", "bench.bench_cpu"], timeout=900, check=False)
    # The worker against vLLM's own OpenAI server on the tiny model (each side's Ray and
    # engine of its own, one after the other), last.
    peer = subprocess.run([sys.executable, "-m", "bench.bench_peer"], timeout=1500, check=False)
    return capacity.returncode or take.returncode or cpu.returncode or peer.returncode


if __name__ == "__main__":
    sys.exit(main())
