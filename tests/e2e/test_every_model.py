"""Every catalogue model, end to end: the API takes a task, a real worker runs it against the
simulator process (each protocol at its own path prefix), and the stored images have the
catalogue's pixels, as many as the request asked for."""

from typing import Any

import pytest
from conftest import Sim, bearer, wait_for_status
from litestar.testing import AsyncTestClient

from pricing.catalog import ModelEntry, load_catalog
from pricing.request import resolve_request
from workers.simulator.png import png_size

CATALOG = load_catalog()


def sizes_to_try(model: ModelEntry) -> list[dict[str, str]]:
    """The model's default size, and its last size and quality (its largest, as shipped)."""
    if model.sizes is not None:
        size = list(model.sizes)[-1]
        return [{}, {"size": size, "quality": list(model.sizes[size])[-1]}]
    bounds = model.dimensions
    assert bounds is not None
    return [{}, {"size": f"{bounds.max_side}x{bounds.min_side}"}]


def catalogue_pixels(model: ModelEntry, fields: dict[str, str]) -> tuple[int, int]:
    """The pixels the catalogue itself gives for these fields, read from its table."""
    if model.sizes is not None:
        size = fields.get("size", model.default_size)
        quality = fields.get("quality", model.default_quality)
        assert size is not None
        assert quality is not None
        width, height = model.sizes[size][quality]
        return width, height
    assert model.dimensions is not None
    width, _, height = fields.get("size", model.dimensions.default).partition("x")
    return int(width), int(height)


@pytest.mark.parametrize("model", CATALOG.models, ids=lambda model: model.id)
async def test_every_model_completes_with_images_of_the_catalogue_size(
    client: AsyncTestClient[Any],
    tenant_key: tuple[str, str],
    simulator: Sim,
    worker: None,  # a real arq worker in this loop (conftest's start_worker / stop_worker)
    model: ModelEntry,
) -> None:
    _, key = tenant_key
    submitted = []
    for fields in sizes_to_try(model):
        body = {"model": model.id, "prompt": f"every model: {model.name}", **fields}
        response = await client.post("/v1/images/generations", json=body, headers=bearer(key))
        assert response.status_code == 200, response.text
        submitted.append((fields, response.json()["id"]))

    for fields, task_id in submitted:
        done = await wait_for_status(
            client, key, task_id, {"completed", "failed", "cancelled"}, wait=30
        )
        assert done["status"] == "completed", done
        expected = resolve_request(model, {"prompt": "x", **fields}).images
        assert len(done["results"]) == expected
        for url in done["results"]:
            image = await client.get(url)
            assert image.status_code == 200, url
            assert png_size(image.content) == catalogue_pixels(model, fields), fields
    stats = await simulator.stats()
    assert stats["submits"] == len(submitted)
