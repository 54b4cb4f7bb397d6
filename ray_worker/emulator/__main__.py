"""``python -m ray_worker.emulator``: run the Bella-Queue emulator."""

from ray_worker.emulator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
