"""The committed configuration reference equals what ``ray_worker.dev.config_reference`` renders."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from ray_worker import config
from ray_worker.dev.config_reference import MODELS, REGENERATE, render, render_model

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_committed_reference_is_current() -> None:
    assert REFERENCE.read_text() == render(), (
        f"docs/configuration.md is stale; regenerate it with `{REGENERATE}`"
    )


def test_every_public_config_model_is_documented() -> None:
    public = {
        getattr(config, name)
        for name in config.__all__
        if isinstance(getattr(config, name), type) and issubclass(getattr(config, name), BaseModel)
    }
    assert public == set(MODELS)


def test_every_field_has_a_row_with_its_description() -> None:
    for model in MODELS:
        section = render_model(model)
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
            rows = [line for line in section.splitlines() if line.startswith("| `")]
            assert any(name.upper() in row or f"`{name}`" in row for row in rows), name


def test_types_and_defaults_are_rendered() -> None:
    poller = render_model(config.PollerConfig)
    strategies = " \\| ".join(
        f'"{s}"' for s in ("fifo", "round_robin", "active_passive", "sequential")
    )
    assert f"| `strategy` | {strategies} |" in poller
    assert "| `max_take_size` | int | `32` |" in poller
    app = render_model(config.WorkerAppArgs)
    assert "| `queue_url` | str \\| null | `null` |" in app
    assert "see [PollerConfig](#pollerconfig)" in app
    queue = render_model(config.QueueSpec)
    assert "| `name` | str | required |" in queue
    assert "&lt;queue&gt;:&lt;level&gt;" in queue  # raw <...> would vanish as an HTML tag
    env = render_model(config.EnvSettings)
    assert "| `BELLA_QUEUE_APIKEY` | secret string \\| null | `null` |" in env
